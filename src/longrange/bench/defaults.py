"""Reference defaults: a longrange compat class against its reference package, both built from
the same keywords, timed in the same process.

``--compare-reference`` (:mod:`longrange.bench.speed`) times longrange's ``bench`` preset in
the benchmark process and the reference in a child process. For the issue's comparison of
the classes users call with the references' own defaults this module builds both sides
through their reference-named classes from one keyword dict (the benchmark size plus the
options the comparison names; every other keyword at its default), in one fresh child
process per (family, length), and times them alternately after a warm-up each, so that load
on the machine falls on both alike. Reported: each side's median forward + backward time,
and the median of the per-round ratios (reference / longrange) with its spread.

``python -m longrange.bench.defaults routing,sinkhorn 8192 [repeats]`` prints the rows (JSON
lines) and writes them to ``benchmarks/results/<device>/defaults.json``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SIZE = {"num_tokens": 256, "dim": 256, "depth": 4, "heads": 4}

# family -> (reference module, longrange compat module, class name, the options compared)
CASES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "routing": (
        "routing_transformer",
        "longrange.models.routing.compat",
        "RoutingTransformerLM",
        {"causal": True, "window_size": 128, "n_local_attn_heads": 2},
    ),
    "sinkhorn": (
        "sinkhorn_transformer",
        "longrange.models.sinkhorn.compat",
        "SinkhornTransformerLM",
        {"causal": True, "bucket_size": 128},
    ),
}


def keywords(family: str, length: int) -> dict[str, Any]:
    """The keywords both sides are built with."""
    return {**SIZE, "max_seq_len": length, **CASES[family][3]}


def build(family: str, length: int, side: str) -> torch.nn.Module:
    """The reference's class (``side="reference"``) or longrange's compat class of the same
    name (``side="longrange"``), from :func:`keywords`."""
    reference, ours, name, _ = CASES[family]
    module = importlib.import_module(reference if side == "reference" else ours)
    torch.manual_seed(0)
    return getattr(module, name)(**keywords(family, length)).train()


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """One forward + backward of tokens [1, N + 1]; the auxiliary loss of a model that
    returns one (routing's k-means commitment) is part of the loss, as in training."""
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1])
    logits, aux = out if isinstance(out, tuple) else (out, None)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    (loss if aux is None else loss + aux).backward()


def compare_in_process(family: str, length: int, repeats: int) -> dict[str, Any]:
    """Time both sides alternately in this process (see the module docstring)."""
    models = {side: build(family, length, side) for side in ("longrange", "reference")}
    tokens = torch.randint(0, SIZE["num_tokens"], (1, length + 1))
    for model in models.values():
        train_step(model, tokens)
    times: dict[str, list[float]] = {side: [] for side in models}
    for _ in range(repeats):
        for side, model in models.items():
            start = time.perf_counter()
            train_step(model, tokens)
            times[side].append(time.perf_counter() - start)
    ratios = [r / o for o, r in zip(times["longrange"], times["reference"])]
    return {
        "family": family,
        "length": length,
        "keywords": keywords(family, length),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "longrange_s": statistics.median(times["longrange"]),
        "reference_s": statistics.median(times["reference"]),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def available(family: str) -> bool:
    return family in CASES and importlib.util.find_spec(CASES[family][0]) is not None


def run_defaults(
    families: list[str], lengths: list[int], *, repeats: int = 5, out_dir: str | Path = "benchmarks/results"
) -> list[dict[str, Any]]:
    """Compare every (family, length) in a fresh child process; write and return the rows."""
    from longrange.bench.device import environment
    from longrange.bench.speed import merge_results, results_path

    unknown = sorted(set(families) - set(CASES))
    if unknown:
        raise ValueError(f"no reference-defaults comparison for {unknown}; known: {sorted(CASES)}")
    rows = []
    for family in families:
        if not available(family):
            print(f"{family}: reference package {CASES[family][0]} not installed, skipped", flush=True)
            continue
        for length in lengths:
            cmd = [
                sys.executable,
                "-m",
                "longrange.bench.defaults",
                "--worker",
                family,
                str(length),
                str(repeats),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                row = {"family": family, "length": length, "error": reason[:200]}
            row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            print(json.dumps(row), flush=True)
            rows.append(row)
    env = environment("cpu")
    merge_results(results_path(out_dir, "cpu", "defaults"), env, rows, keys=("family", "length"))
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        fam, n, reps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(compare_in_process(fam, n, reps)))
    else:
        reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
        run_defaults(sys.argv[1].split(","), [int(x) for x in sys.argv[2].split(",")], repeats=reps)
