"""``longrange bench speed``: forward+backward and forward-only time, tokens/s, peak memory.

Each (family, length) point: one warm-up, then the median of ``repeats`` timed runs. Peak
memory is measured in a fresh process per point (the CUDA allocator's peak on GPU; the growth
of the resident-set high-water mark on CPU), so one point's allocations cannot hide another's.
Families are benchmarked at one shared size: their ``bench`` preset, or dim 256, depth 4,
heads 4 on top of their default config.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from longrange.bench.device import device_slug, environment
from longrange.bench.flops import count_flops, growth_exponents, matmul_peak
from longrange.models.registry import get_family

BENCH_SIZE = {"dim": 256, "depth": 4, "heads": 4}


def bench_model(family: str, length: int, device: str):
    fam = get_family(family)
    config = fam.presets["bench"]() if "bench" in fam.presets else fam.config_class(**BENCH_SIZE)
    if not getattr(fam.model_class, "bench_feeds_chunks", False):
        config = config.replace(max_seq_len=max(config.max_seq_len, length))
    return fam.model_class(config).to(device)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(model, tokens: torch.Tensor) -> None:
    if getattr(model, "bench_feeds_chunks", False):
        _fwd_bwd_chunks(model, tokens)
        return
    out = model.forward_lm(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()


def _fwd_bwd_chunks(model, tokens: torch.Tensor) -> None:
    """For families that set ``bench_feeds_chunks`` (memorizing): read the length as training
    does, chunk by chunk (``max_seq_len`` tokens) through a fresh state that fills as it goes,
    with a forward and a backward per chunk."""
    size = model.config.max_seq_len
    state = model.init_state(tokens.shape[0], tokens.device)
    for start in range(0, tokens.shape[1] - 1, size):
        piece = tokens[:, start : start + size + 1]
        out = model.forward_lm(piece[:, :-1], state=state)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), piece[:, 1:].flatten())
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        state = model.detach_state(out.state)


def _timed(fn, device: str, repeats: int, *, warmed: bool = False) -> float:
    if not warmed:
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_point(
    family: str, length: int, *, device: str, repeats: int, batch_size: int, peak_flops: float | None = None
) -> dict[str, Any]:
    """Time one (family, length) point; the warm-up run is also the one whose FLOPs are counted."""
    torch.manual_seed(0)
    model = bench_model(family, length, device).train()
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, length + 1), device=device)

    def train_step():
        model.zero_grad(set_to_none=True)
        _fwd_bwd(model, tokens)

    def forward():
        with torch.no_grad():
            model.forward_lm(tokens[:, :-1])

    flops = count_flops(train_step)
    fwd_bwd = _timed(train_step, device, repeats, warmed=True)
    model.eval()
    fwd = _timed(forward, device, repeats)
    row = {
        "family": family,
        "length": length,
        "batch_size": batch_size,
        "params": model.num_params(),
        "fwd_bwd_s": fwd_bwd,
        "fwd_s": fwd,
        "tokens_per_s": batch_size * length / fwd_bwd,
        "fwd_bwd_flops": flops,
    }
    if peak_flops:
        row["mfu"] = flops / fwd_bwd / peak_flops
        row["matmul_peak_gflops"] = peak_flops / 1e9  # per row: merged runs may measure differently
    return row


def memory_point(family: str, length: int, *, device: str, batch_size: int) -> float:
    """Peak memory (MB) of one forward+backward, measured in this process.

    ``family`` may be ``ref:<family>`` for the reference package's model (CPU only).
    """
    torch.manual_seed(0)
    if family.startswith("ref:"):
        from longrange.bench.reference import BUILDERS, reference_step

        ref = BUILDERS[family[4:]][1](length).train()
        tokens = torch.randint(0, 256, (1, length + 1))
        before = _current_rss_kib()
        _reset_peak_rss()
        reference_step(ref, tokens)
        return (_peak_rss_kib() - before) / 1024
    model = bench_model(family, length, device).train()
    tokens = torch.randint(0, model.config.vocab_size, (batch_size, length + 1), device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _fwd_bwd(model, tokens)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _current_rss_kib()
    _reset_peak_rss()
    _fwd_bwd(model, tokens)
    return (_peak_rss_kib() - before) / 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _current_rss_kib() -> int:
    value = _status_kib("VmRSS")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> None:
    # Linux resets the high-water mark (VmHWM) when "5" is written to clear_refs, so the peak
    # we read afterwards belongs to this measurement, not to imports or model construction.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_kib() -> int:
    value = _status_kib("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cap_address_space() -> None:
    """Child-process hook for the reference packages on CPU: cap the address space at 80% of
    the machine's memory, so a reference that outgrows it (the Performer reference's causal
    path wants 22 GB at 8K) fails with an allocation error instead of pushing the machine
    into the kernel's out-of-memory killer."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = int(0.8 * total)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def memory_in_fresh_process(family: str, length: int, *, device: str, batch_size: int) -> float | None:
    cmd = [sys.executable, "-m", "longrange.bench.speed", family, str(length), device, str(batch_size)]
    # glibc raises its mmap threshold as large blocks are freed, after which freed activations
    # stay in the heap and the resident peak counts fragmentation. Pinning the threshold at its
    # initial 128 KiB returns large blocks to the system, so the peak is the live peak, the same
    # way for every family and reference.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    capped = family.startswith("ref:") and torch.device(device).type == "cpu"
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, preexec_fn=_cap_address_space if capped else None
    )
    if proc.returncode != 0:
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def results_path(out_dir: str | Path, device: str, suite: str) -> Path:
    return Path(out_dir) / device_slug(device) / f"{suite}.json"


def merge_results(
    path: Path,
    env: dict[str, str],
    rows: list[dict[str, Any]],
    keys: tuple[str, ...] = ("family", "length", "batch_size"),
) -> None:
    """Replace earlier rows with the same key fields and keep the rest."""
    from longrange.atomic import atomic_write_json

    existing: list[dict[str, Any]] = []
    if path.is_file():
        try:
            existing = json.loads(path.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            existing = []

    def key(r: dict[str, Any]) -> tuple:
        return tuple(str(r.get(k)) for k in keys)

    fresh = {key(r) for r in rows}
    merged = [r for r in existing if key(r) not in fresh] + rows
    merged.sort(key=key)
    atomic_write_json(path, {"suite": path.stem, "environment": env, "results": merged})


def _reference_rows(
    family: str, lengths: list[int], *, device: str, repeats: int, memory: bool
) -> list[dict]:
    from longrange.bench.reference import reference_available

    if torch.device(device).type != "cpu" or not reference_available(family):
        return []
    out = []
    for length in lengths:
        row = _reference_point_in_fresh_process(family, length, repeats)
        if "error" not in row and memory:
            row["peak_mb"] = memory_in_fresh_process(f"ref:{family}", length, device=device, batch_size=1)
        row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(format_table([row]).splitlines()[-1], flush=True)
        out.append(row)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'family':<16}{'length':>8}{'fwd+bwd s':>12}{'fwd s':>10}{'tokens/s':>12}{'peak MB':>10}"
        f"{'MFU':>7}{'growth':>8}"
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
        lines.append(
            f"{r['family']:<16}{r['length']:>8}{r['fwd_bwd_s']:>12.3f}{fwd:>10}"
            f"{r['tokens_per_s']:>12,.0f}{mem:>10}{mfu:>7}{growth:>8}"
        )
    return "\n".join(lines)


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
) -> list[dict[str, Any]]:
    """Time every (family, length); with ``compare_reference`` also the installed reference
    packages at ``reference_lengths`` (default: all of ``lengths``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"lengths must be integers >= 2, got {lengths}")
    if reference_lengths is not None and any(n < 2 for n in reference_lengths):
        raise ValueError(f"reference_lengths must be integers >= 2, got {reference_lengths}")
    env = environment(device)
    peak = matmul_peak(device)
    env["matmul_peak_gflops"] = f"{peak / 1e9:.1f}"
    rows = []
    for family in families:
        family_rows = []
        for length in sorted(lengths):
            try:
                row = time_point(
                    family, length, device=device, repeats=repeats, batch_size=batch_size, peak_flops=peak
                )
            except (RuntimeError, ValueError) as err:  # out of memory, or a length the config refuses
                row = {"family": family, "length": length, "batch_size": batch_size, "error": str(err)[:200]}
            else:
                if memory:
                    row["peak_mb"] = memory_in_fresh_process(
                        family, length, device=device, batch_size=batch_size
                    )
            row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            family_rows.append(row)
            rows.append(row)
            print(format_table([row]).splitlines()[-1] if rows[1:] else format_table([row]), flush=True)
        if compare_reference:
            family_rows += _reference_rows(
                family, sorted(reference_lengths or lengths), device=device, repeats=repeats, memory=memory
            )
            rows += family_rows[len(lengths) :]
        timed = [r for r in family_rows[: len(lengths)] if "fwd_bwd_s" in r]
        for r, p in zip(
            timed, growth_exponents([r["length"] for r in timed], [r["fwd_bwd_s"] for r in timed])
        ):
            r["growth"] = p
    path = results_path(out_dir, device, "speed")
    merge_results(path, env, rows)
    print(f"\n{env['device']}, torch {env['torch']}\n{format_table(rows)}\nwritten: {path}")
    return rows


def _reference_point_in_fresh_process(family: str, length: int, repeats: int) -> dict[str, Any]:
    """Time a reference package in a child process: some build tensors that outgrow the
    machine (the Performer reference's causal path at 8K on 24 GiB) and are killed by the
    kernel, which must not take the benchmark run with them."""
    cmd = [sys.executable, "-m", "longrange.bench.speed", "--reference", family, str(length), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_cap_address_space)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = (
        f"killed by signal {-proc.returncode} (out of memory?)"
        if proc.returncode < 0
        else (proc.stderr.strip().splitlines() or ["failed"])[-1]
    )
    return {"family": f"{family} (reference)", "length": length, "batch_size": 1, "error": reason[:200]}


if __name__ == "__main__":
    if sys.argv[1] == "--reference":
        # Worker for _reference_point_in_fresh_process: --reference family length repeats
        from longrange.bench.reference import time_reference_point

        row = time_reference_point(sys.argv[2], int(sys.argv[3]), repeats=int(sys.argv[4]))
        print(json.dumps(row))
    else:
        # Worker for memory_in_fresh_process: family length device batch_size
        fam, n, dev, bs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        print(memory_point(fam, n, device=dev, batch_size=bs))
