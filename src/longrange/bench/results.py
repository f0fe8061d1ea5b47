"""The benchmark suites' results files: ``benchmarks/results/<device>/<suite>.json``, each a
list of rows merged run after run (a row replaces the earlier one with the same key fields,
keeping the parts it did not measure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longrange.atomic import atomic_write_json
from longrange.bench.device import device_slug


def results_path(out_dir: str | Path, device: str, suite: str) -> Path:
    return Path(out_dir) / device_slug(device) / f"{suite}.json"


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
    row did not measure, :data:`CARRIED`) and keep the rest."""
    existing: list[dict[str, Any]] = []
    if path.is_file():
        try:
            existing = json.loads(path.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            existing = []

    def key(r: dict[str, Any]) -> tuple:
        return tuple(str(r.get(k)) for k in keys)

    fresh = {key(r) for r in rows}
    earlier = {key(r): r for r in existing}
    rows = [_carry(earlier[key(r)], r) if key(r) in earlier else r for r in rows]
    merged = [r for r in existing if key(r) not in fresh] + rows
    merged.sort(key=key)
    atomic_write_json(path, {"suite": path.stem, "environment": env, "results": merged})
