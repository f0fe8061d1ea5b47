"""``longrange bench growth``: how a family's training throughput holds up as the input grows,
each length measured against the first in the same run.

The speed suite times its lengths one after another, so the drift of a shared machine between
two points reads as growth (on this project's 2-core CPU, the same point differs by 5-10%
between runs, more than the flatness the performance aims ask about). Here every length of a
family has its own model (the same seed, ``bench_model``) in one process, and each round times
one forward + backward at every length in turn, after a warm-up step of each. A row's
``vs_base`` is the median over rounds of its tokens/s over the base length's (the first of
``lengths``) in the same round, ``vs_base_range`` the smallest and largest of those ratios
(how far the machine's drift moved them); ``tokens_per_s`` is from the median step time.
"""

from __future__ import annotations

import statistics
from typing import Any

from longrange.bench.device import environment
from longrange.bench.results import merge_results, results_path
from longrange.bench.speed import bench_inputs, fwd_bwd, stamp
from longrange.bench.timing import steps_in_turn


def _check(lengths: list[int], repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if len(lengths) < 2 or len(set(lengths)) != len(lengths) or any(n < 2 for n in lengths):
        raise ValueError(
            f"lengths must be two or more distinct integers >= 2, the first the base, got {lengths}"
        )


def growth_point(family: str, lengths: list[int], *, device: str, repeats: int) -> list[dict[str, Any]]:
    """One row per length of ``lengths`` (the first is the base) for ``family``, all measured
    in turn in this process (see the module docstring)."""
    _check(lengths, repeats)
    steps = []
    for length in lengths:
        model, tokens = bench_inputs(family, length, device)

        def step(model=model, tokens=tokens):
            model.zero_grad(set_to_none=True)
            fwd_bwd(model, tokens)

        steps.append(step)
    times = steps_in_turn(steps, repeats, device)
    base, base_times = lengths[0], times[0]
    rows = []
    for length, spent in zip(lengths, times):
        ratios = [length * b / (base * t) for t, b in zip(spent, base_times)]
        rows.append(
            {
                "family": family,
                "length": length,
                "base_length": base,
                "batch_size": 1,
                "rounds": repeats,
                "fwd_bwd_s": statistics.median(spent),
                "tokens_per_s": length / statistics.median(spent),
                "vs_base": statistics.median(ratios),
                "vs_base_range": [min(ratios), max(ratios)],
            }
        )
    return rows


def format_growth_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'family':<16}{'length':>8}{'base':>8}{'tokens/s':>12}{'vs base':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['family']:<16}{r['length']:>8}{r['base_length']:>8}  error: {r['error']}")
            continue
        lines.append(
            f"{r['family']:<16}{r['length']:>8}{r['base_length']:>8}"
            f"{r['tokens_per_s']:>12,.0f}{r['vs_base']:>9.2f}"
        )
    return "\n".join(lines)


def run_growth_suite(
    families: list[str],
    lengths: list[int],
    *,
    device: str,
    repeats: int = 3,
    out_dir: str = "benchmarks/results",
) -> list[dict[str, Any]]:
    """:func:`growth_point` for every family (a family that fails, e.g. out of memory, gets a
    row with ``error`` per length); rows merge into ``<out>/<device>/growth.json``."""
    _check(lengths, repeats)
    rows = []
    for family in families:
        try:
            got = growth_point(family, lengths, device=device, repeats=repeats)
        except (RuntimeError, ValueError) as err:
            failed = {"base_length": lengths[0], "batch_size": 1, "error": str(err)[:200]}
            got = [{"family": family, "length": n, **failed} for n in lengths]
        got = [stamp(r) for r in got]
        print(format_growth_table(got), flush=True)
        rows += got
    path = results_path(out_dir, device, "growth")
    merge_results(path, environment(device), rows, keys=("family", "length", "base_length"))
    print(f"written: {path}")
    return rows
