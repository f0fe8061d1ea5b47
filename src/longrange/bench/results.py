"""The benchmark suites' results files: ``benchmarks/results/<device>/<suite>.json``, each a
list of rows merged run after run (a row replaces the earlier one with the same key fields,
keeping the parts it did not measure).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from longrange.atomic import atomic_write_json, read_json
from longrange.bench.device import device_slug


def results_path(out_dir: str | Path, device: str, suite: str) -> Path:
    return Path(out_dir) / device_slug(device) / f"{suite}.json"


def read_results(
    path: Path, *, required: tuple[str, ...] = (), measured: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A results file, refused with a ValueError naming it when it is not one: not JSON (a
    truncated write, a hand edit), not an object with a list of rows under ``results``, or a
    row without one of the ``required`` fields (``measured``: required of rows without an
    ``error``). Rows are never skipped: a file that cannot be read whole is refused whole."""
    data = read_json(path, "results file")
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not isinstance(data.get("environment", {}), dict):
        raise ValueError(f"results file {path} is not an object with a list of rows under 'results'")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"results file {path}: row {i} is not an object")
        wanted = required + (() if "error" in row else measured)
        missing = [f for f in wanted if f not in row]
        if missing:
            raise ValueError(f"results file {path}: row {i} has no {', '.join(map(repr, missing))}")
    return data


def check_writable(out_dir: str | Path, device: str, suites: tuple[str, ...]) -> None:
    """Refuse, before any work, an ``--out`` folder the results cannot be written under (a file
    in its place, a folder without write permission) and an existing results file of ``suites``
    that cannot be read (merging would drop its rows)."""
    folder = results_path(out_dir, device, "x").parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {str(out_dir)!r}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out_dir)!r}: no permission to write in {existing}")
    for suite in suites:
        path = results_path(out_dir, device, suite)
        if path.exists():
            read_results(path)


# A row's parts that separate passes measure: ``bench speed --compile`` times the compiled
# step, ``--no-memory`` leaves out the peak. A later pass without them keeps the earlier figures
# (dated by ``<part>_measured_at``) instead of dropping them with the row they came in.
CARRIED = {
    "compiled": ("compiled_fwd_bwd_s", "compiled_tokens_per_s", "compile_s", "compile_error"),
    "peak": ("peak_mb",),
}


def _carry(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the parts of ``old`` (:data:`CARRIED`) it did not measure, if it timed
    the eager step at all (a row that failed keeps nothing of the earlier one)."""
    if "fwd_bwd_s" not in new:
        return new
    for part, fields in CARRIED.items():
        if any(f in new for f in fields) or not any(f in old for f in fields):
            continue
        new = {**new, **{f: old[f] for f in fields if f in old}}
        new[f"{part}_measured_at"] = old.get(f"{part}_measured_at", old.get("measured_at"))
    return new


def merge_results(
    path: Path,
    env: dict[str, str],
    rows: list[dict[str, Any]],
    keys: tuple[str, ...] = ("family", "length", "batch_size"),
) -> None:
    """Replace earlier rows with the same key fields (keeping the parts of them that the new
    row did not measure, :data:`CARRIED`) and keep the rest. An existing file that is not a
    results file is refused (:func:`read_results`), never written over."""
    existing: list[dict[str, Any]] = read_results(path)["results"] if path.exists() else []

    def key(r: dict[str, Any]) -> tuple:
        return tuple(str(r.get(k)) for k in keys)

    fresh = {key(r) for r in rows}
    earlier = {key(r): r for r in existing}
    rows = [_carry(earlier[key(r)], r) if key(r) in earlier else r for r in rows]
    merged = [r for r in existing if key(r) not in fresh] + rows
    merged.sort(key=key)
    atomic_write_json(path, {"suite": path.stem, "environment": env, "results": merged})
