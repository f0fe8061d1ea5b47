"""``longrange bench speed``: forward+backward and forward-only time, tokens/s, peak memory.

Each (family, length) point: one warm-up, then the median of ``repeats`` timed runs. Peak
memory is measured in a fresh process per point (``bench/memory.py``). Families are
benchmarked at one shared size: their ``bench`` preset, or dim 256, depth 4, heads 4 on top of
their default config. ``compile=True`` also times ``torch.compile(model.forward_lm)`` in the
same process (the compile time reported apart), beside the eager numbers.

``compare_reference`` adds, at ``reference_lengths``, the reference packages
(``bench/reference.py``) and the reference-defaults comparison: longrange's reference-named
class against the package with the same keywords, each in a fresh process, and for the
Performer also against the same model with exact SDPA attention; the classes that are
non-causal by their package's default are also paired that way. These pairs are written to
``reference_defaults.json`` beside ``speed.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from longrange import cpu_cache
from longrange.bench.device import environment
from longrange.bench.flops import count_flops, growth_exponents, matmul_peak
from longrange.bench.memory import current_rss_kib, peak_rss_kib, reset_peak_rss, run_child
from longrange.bench.results import merge_results, results_path
from longrange.bench.timing import sync
from longrange.models.registry import get_family

BENCH_SIZE = {"dim": 256, "depth": 4, "heads": 4}


def bench_model(family: str, length: int, device: str):
    fam = get_family(family)
    config = fam.presets["bench"]() if "bench" in fam.presets else fam.config_class(**BENCH_SIZE)
    if not getattr(fam.model_class, "bench_feeds_chunks", False):
        config = config.replace(max_seq_len=max(config.max_seq_len, length))
    return fam.model_class(config).to(device)


def bench_inputs(family: str, length: int, device: str, batch_size: int = 1):
    """The bench model of ``family`` for ``length`` in training mode and its tokens [B, N + 1],
    both from seed 0."""
    torch.manual_seed(0)
    model = bench_model(family, length, device).train()
    return model, torch.randint(0, model.config.vocab_size, (batch_size, length + 1), device=device)


def fwd_bwd(model, tokens: torch.Tensor, forward=None) -> None:
    """One training step's forward and backward over tokens [B, N + 1]; ``forward`` stands in
    for ``model.forward_lm`` (a compiled one)."""
    forward = forward or model.forward_lm
    if getattr(model, "bench_feeds_chunks", False):
        _fwd_bwd_chunks(model, tokens, forward)
        return
    out = forward(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()


def _fwd_bwd_chunks(model, tokens: torch.Tensor, forward) -> None:
    """For families that set ``bench_feeds_chunks`` (memorizing): read the length as training
    does, chunk by chunk (``max_seq_len`` tokens) through a fresh state that fills as it goes,
    with a forward and a backward per chunk."""
    size = model.config.max_seq_len
    state = model.init_state(tokens.shape[0], tokens.device)
    for start in range(0, tokens.shape[1] - 1, size):
        piece = tokens[:, start : start + size + 1]
        out = forward(piece[:, :-1], state=state)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), piece[:, 1:].flatten())
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        state = model.detach_state(out.state)


def _timed(fn, device: str, repeats: int, *, warmed: bool = False) -> float:
    if not warmed:
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_point(
    family: str,
    length: int,
    *,
    device: str,
    repeats: int,
    batch_size: int,
    mfu: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Time one (family, length) point; the warm-up run is also the one whose FLOPs are counted.
    With ``mfu`` the row's MFU is against the best matmul rate measured just before and just
    after the timed steps."""
    model, tokens = bench_inputs(family, length, device, batch_size)

    def train_step(forward=None):
        model.zero_grad(set_to_none=True)
        if forward is not None:
            model.before_compiled_step()
        fwd_bwd(model, tokens, forward)

    def forward():
        with torch.no_grad():
            model.forward_lm(tokens[:, :-1])

    flops = count_flops(train_step)
    # MFU against the peak around this point's own steps, measured just before and just after
    # them: this CPU's speed drifts by up to 30-40% within minutes, so a peak measured once
    # at the start of a long run read 258 GFLOP/s in one phase and 365 in another, and the
    # same memorizing 16K throughput (5.1K tok/s) came out at 33% or 45% MFU
    before = matmul_peak(device, repeats=5) if mfu else None
    fwd_bwd_s = _timed(train_step, device, repeats, warmed=True)
    point_peak = max(before, matmul_peak(device, repeats=5)) if mfu else None
    model.eval()
    fwd = _timed(forward, device, repeats)
    row = {
        "family": family,
        "length": length,
        "batch_size": batch_size,
        "params": model.num_params(),
        "fwd_bwd_s": fwd_bwd_s,
        "fwd_s": fwd,
        "tokens_per_s": batch_size * length / fwd_bwd_s,
        "fwd_bwd_flops": flops,
    }
    if point_peak:
        row["mfu"] = flops / fwd_bwd_s / point_peak
        row["matmul_peak_gflops"] = point_peak / 1e9  # per row: measured around the point
    if compile:
        model.train()
        row.update(_compiled_timing(model, train_step, device, repeats, batch_size * length))
    return row


def _compiled_timing(model, train_step, device: str, repeats: int, tokens: int) -> dict[str, Any]:
    """The training step through ``torch.compile(model.forward_lm)``: the first call's time
    (tracing and code generation included) and the median of ``repeats`` after it."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(model.forward_lm)
    start = time.perf_counter()
    try:
        train_step(compiled)
        sync(device)
    except Exception as err:  # a backend that cannot build this model: say so in the row
        return {"compile_error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    first = time.perf_counter() - start
    seconds = _timed(lambda: train_step(compiled), device, repeats, warmed=True)
    return {
        "compiled_fwd_bwd_s": seconds,
        "compiled_tokens_per_s": tokens / seconds,
        "compile_s": max(first - seconds, 0.0),
    }


def memory_point(family: str, length: int, *, device: str, batch_size: int) -> float:
    """Peak memory (MB) of one forward+backward, measured in this process (CUDA allocator
    peak on GPU, resident-set high-water growth on CPU). ``ref:<family>`` measures the
    reference package's model (CPU only)."""
    torch.manual_seed(0)
    if family.startswith("ref:"):
        from longrange.bench.reference import build, reference_step

        model = build(family[4:], length).train()
        tokens = torch.randint(0, 256, (1, length + 1))
        step = lambda: reference_step(model, tokens)  # noqa: E731
    else:
        model, tokens = bench_inputs(family, length, device, batch_size)
        step = lambda: fwd_bwd(model, tokens)  # noqa: E731
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = current_rss_kib()
    reset_peak_rss()
    step()
    return (peak_rss_kib() - before) / 1024


def memory_in_fresh_process(family: str, length: int, *, device: str, batch_size: int) -> float | None:
    """:func:`memory_point` in a child process; None when it fails (out of memory, a length
    the configuration refuses)."""
    # glibc raises its mmap threshold as large blocks are freed, after which freed activations
    # stay in the heap and the resident peak counts fragmentation. Pinning the threshold at its
    # initial 128 KiB returns large blocks to the system, so the peak is the live peak, the same
    # way for every family and reference.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    capped = family.startswith("ref:") and torch.device(device).type == "cpu"
    out, _ = run_child(
        "longrange.bench.speed", [family, str(length), device, str(batch_size)], capped=capped, env=env
    )
    return None if out is None else float(out)


def _reference_rows(
    family: str, lengths: list[int], *, device: str, repeats: int, memory: bool
) -> tuple[list[dict], list[dict]]:
    """The reference package's rows at ``lengths`` and the reference-defaults pairs
    (:func:`~longrange.bench.reference.compare_at_defaults`): (speed rows, pairs)."""
    from longrange.bench.reference import compare_at_defaults, reference_available, variants

    if torch.device(device).type != "cpu" or not reference_available(family):
        return [], []
    out = []
    for length in lengths:
        row = _reference_point_in_fresh_process(family, length, repeats)
        if "error" not in row and memory:
            row["peak_mb"] = memory_in_fresh_process(f"ref:{family}", length, device=device, batch_size=1)
        out.append(stamp(row))
        print(format_table([row]).splitlines()[-1], flush=True)
    pairs = []
    for setting, rows in ((family, out), *((name, []) for name in variants(family))):
        pairs += compare_at_defaults(
            setting,
            lengths,
            rows,
            repeats=repeats,
            timer=_reference_point_in_fresh_process,
            timer_in_turn=_in_turn_in_fresh_process,
        )
    return out, [stamp(p) for p in pairs]


def stamp(row: dict[str, Any]) -> dict[str, Any]:
    """When the row was measured, and whether with the CPU allocation cache (its children
    run with this process's setting)."""
    row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    row["cpu_cache"] = "on" if cpu_cache.enabled() else "off"
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    compiled = any("compiled_fwd_bwd_s" in r or "compile_error" in r for r in rows)
    head = (
        f"{'family':<16}{'length':>8}{'fwd+bwd s':>12}{'fwd s':>10}{'tokens/s':>12}{'peak MB':>10}"
        f"{'MFU':>7}{'growth':>8}" + (f"{'compiled tok/s':>16}{'compile s':>11}" if compiled else "")
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        if "error" in r:
            lines.append(f"{r['family']:<16}{r['length']:>8}  {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") is not None else "-"
        growth = f"{r['growth']:.2f}" if r.get("growth") is not None else "-"
        fwd = f"{r['fwd_s']:.3f}" if r.get("fwd_s") is not None else "-"
        line = (
            f"{r['family']:<16}{r['length']:>8}{r['fwd_bwd_s']:>12.3f}{fwd:>10}"
            f"{r['tokens_per_s']:>12,.0f}{mem:>10}{mfu:>7}{growth:>8}"
        )
        if "compiled_tokens_per_s" in r:
            line += f"{r['compiled_tokens_per_s']:>16,.0f}{r['compile_s']:>11.1f}"
        elif "compile_error" in r:
            line += f"  compile failed: {r['compile_error']}"
        lines.append(line)
    return "\n".join(lines)


def _check_lengths(lengths: list[int], reference_lengths: list[int] | None, repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"lengths must be integers >= 2, got {lengths}")
    if reference_lengths is not None and any(n < 2 for n in reference_lengths):
        raise ValueError(f"reference_lengths must be integers >= 2, got {reference_lengths}")


def run_speed_suite(
    families: list[str],
    lengths: list[int],
    *,
    device: str,
    repeats: int = 3,
    batch_size: int = 1,
    out_dir: str | Path = "benchmarks/results",
    memory: bool = True,
    compare_reference: bool = False,
    reference_lengths: list[int] | None = None,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Time every (family, length) (eager, and compiled with ``compile``); with
    ``compare_reference`` also the installed reference packages and the reference-defaults
    comparison at ``reference_lengths`` (default: all of ``lengths``)."""
    _check_lengths(lengths, reference_lengths, repeats)
    env = environment(device)
    peak = matmul_peak(device)
    env["matmul_peak_gflops"] = f"{peak / 1e9:.1f}"
    rows, pairs = [], []
    for family in families:
        family_rows = []
        for length in sorted(lengths):
            try:
                row = time_point(
                    family,
                    length,
                    device=device,
                    repeats=repeats,
                    batch_size=batch_size,
                    mfu=True,
                    compile=compile,
                )
            except (RuntimeError, ValueError) as err:  # out of memory, or a length the config refuses
                row = {"family": family, "length": length, "batch_size": batch_size, "error": str(err)[:200]}
            else:
                if memory:
                    row["peak_mb"] = memory_in_fresh_process(
                        family, length, device=device, batch_size=batch_size
                    )
            family_rows.append(stamp(row))
            rows.append(row)
            print(format_table([row]).splitlines()[-1] if rows[1:] else format_table([row]), flush=True)
        timed = [r for r in family_rows if "fwd_bwd_s" in r]
        for r, p in zip(
            timed, growth_exponents([r["length"] for r in timed], [r["fwd_bwd_s"] for r in timed])
        ):
            r["growth"] = p
        if compare_reference:
            ref_rows, ref_pairs = _reference_rows(
                family, sorted(reference_lengths or lengths), device=device, repeats=repeats, memory=memory
            )
            rows += ref_rows
            pairs += ref_pairs
    path = results_path(out_dir, device, "speed")
    merge_results(path, env, rows)
    print(f"\n{env['device']}, torch {env['torch']}\n{format_table(rows)}\nwritten: {path}")
    if pairs:
        from longrange.bench.reference import format_pairs

        path = results_path(out_dir, device, "reference_defaults")
        merge_results(path, env, pairs, keys=("family", "length", "against"))
        print(f"\nreference defaults\n{format_pairs(pairs)}\nwritten: {path}")
    return rows


def _reference_point_in_fresh_process(
    family: str, length: int, repeats: int, source: str = "reference", fill: int | None = None
) -> dict[str, Any]:
    """Time a model of ``bench/reference.py`` in a child process: some reference packages
    build tensors that outgrow the machine (the Performer reference's causal path at 8K) and
    are killed by the kernel, which must not take the benchmark run with them."""
    return _in_child(family, length, repeats, (source,), fill)[0]


def _in_turn_in_fresh_process(
    family: str, length: int, repeats: int, sources: tuple[str, ...], fill: int | None = None
) -> list[dict[str, Any]]:
    """:func:`~longrange.bench.reference.time_in_turn` in a child process."""
    return _in_child(family, length, repeats, sources, fill)


def _in_child(
    family: str, length: int, repeats: int, sources: tuple[str, ...], fill: int | None
) -> list[dict[str, Any]]:
    """The rows of ``time_in_turn`` from a child process; a row with ``error`` per source when
    the child fails."""
    from longrange.bench.reference import row_name

    args = ["--reference", family, str(length), str(repeats), str(fill or 0), *sources]
    out, reason = run_child("longrange.bench.speed", args, capped=True)
    if out is not None:
        return json.loads(out)
    return [
        {"family": row_name(family, s), "length": length, "batch_size": 1, "error": reason[:200]}
        for s in sources
    ]


if __name__ == "__main__":
    if sys.argv[1] == "--reference":
        # Worker for _in_child: --reference family length repeats fill source...
        from longrange.bench.reference import time_in_turn

        fam, n, reps, fill = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) or None
        print(json.dumps(time_in_turn(fam, n, repeats=reps, sources=tuple(sys.argv[6:]), fill=fill)))
    else:
        # Worker for memory_in_fresh_process: family length device batch_size
        fam, n, dev, bs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        print(memory_point(fam, n, device=dev, batch_size=bs))
