"""``longrange bench``: the benchmark suites."""

from __future__ import annotations

import argparse
from typing import Any

from longrange.cli.loading import KEEP_DENORMALS_HELP, flushed_denormals, int_list, pick_device, use_cpu_cache
from longrange.models.registry import get_family


def cmd_bench(args: argparse.Namespace) -> int:
    from longrange.bench.suites import run_suite
    from longrange.models.registry import available_families

    if args.lengths is not None:
        lengths = int_list("--lengths", args.lengths)
    elif args.suite == "knn":
        from longrange.bench.knn import DEFAULT_FILLS

        lengths = list(DEFAULT_FILLS)
    else:
        lengths = [1024, 4096]
    chosen = args.models or ("all" if args.suite == "context" else "vanilla")
    models = available_families() if chosen == "all" else [m.strip() for m in chosen.split(",") if m.strip()]
    for m in models:
        get_family(m)
    try:
        low, high = (int(x) for x in args.listops_length.split(","))
    except ValueError:
        raise ValueError(
            f"--listops-length must be MIN,MAX (two integers), got {args.listops_length!r}"
        ) from None
    if not 1 <= low <= high:
        raise ValueError(f"--listops-length needs 1 <= MIN <= MAX, got {args.listops_length!r}")
    options = {
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "out": args.out,
        "no_memory": args.no_memory,
        "compare_reference": args.compare_reference,
        "compile": args.compile,
        "steps": args.steps,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "readme": args.readme,
        "listops_length": (low, high),
        "reference_lengths": (
            int_list("--reference-lengths", args.reference_lengths) if args.reference_lengths else None
        ),
        "parts": [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts is not None else None,
        "budget": args.budget,
        "recall_budget": args.recall_budget,
        "seeds": int_list("--seeds", args.seeds) if args.seeds is not None else None,
    }
    device = pick_device(args.device)
    use_cpu_cache(device, not args.no_cpu_cache, "bench")
    with flushed_denormals(device, not args.keep_denormals, "bench"):
        run_suite(args.suite, models, lengths, device=device, options=options)
    return 0


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks: speed, memory, generation, recall, quality; report")
    b.add_argument(
        "suite",
        choices=[
            "speed",
            "growth",
            "memory",
            "generate",
            "recall",
            "quality",
            "listops",
            "context",
            "knn",
            "report",
        ],
        help="speed (time, tokens/s, MFU, growth, peak memory), growth (tokens/s at each of --lengths "
        "against the first, measured in turn in one process), memory, generate (decoding tokens/s), "
        "recall (synthetic tasks), quality (bits per byte after a fixed budget), "
        "listops (Long Range Arena classification), context (long-context evidence: loss by "
        "position, ablations, recall at distance, equal compute), knn (memorizing's chunk cost and "
        "recall@k as its memory fills to each of --lengths entries), report (plots + README tables)",
    )
    b.add_argument(
        "--models",
        default=None,
        help="comma-separated families, or 'all' (default vanilla; context: all)",
    )
    b.add_argument(
        "--lengths",
        default=None,
        help="comma-separated sequence lengths (speed, growth, memory; default 1024,4096), or memory "
        "fills (knn; default 0,32768,250000)",
    )
    b.add_argument("--batch-size", type=int, default=1, help="batch size (default 1)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda")
    b.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    b.add_argument(
        "--no-memory", action="store_true", help="speed: skip the fresh-process memory measurement"
    )
    b.add_argument(
        "--compare-reference", action="store_true", help="speed: also time the installed reference packages"
    )
    b.add_argument(
        "--compile",
        action="store_true",
        help="speed: also time torch.compile(model) beside eager, same run; generate: compiled steps too",
    )
    b.add_argument(
        "--reference-lengths",
        default=None,
        help="speed: lengths at which --compare-reference times the references (default: --lengths)",
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help="recall / quality / listops: training steps per family; context: fixed steps per run "
        "instead of the calibrated --budget",
    )
    b.add_argument(
        "--parts",
        default=None,
        help="context: comma-separated parts, from position,ablation,recall,compute (default all)",
    )
    b.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="context: training seconds per language-model run, turned into steps per family by "
        "timing them on this machine (default 60)",
    )
    b.add_argument(
        "--recall-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="context: training seconds per recall run (default 100)",
    )
    b.add_argument("--seeds", default=None, help="context: comma-separated seeds (default 0,1)")
    b.add_argument(
        "--listops-length",
        default="500,2000",
        help="listops: MIN,MAX characters per expression (default 500,2000, as Long Range Arena)",
    )
    b.add_argument("--prompt-len", type=int, default=1024, help="generate: prompt length (default 1024)")
    b.add_argument("--new-tokens", type=int, default=1024, help="generate: tokens to decode (default 1024)")
    b.add_argument("--readme", default="README.md", help="report: the README whose tables are rewritten")
    b.add_argument(
        "--no-cpu-cache",
        action="store_true",
        help="on CPU, keep torch's own allocator (default: cache large blocks, see longrange.cpu_cache)",
    )
    b.add_argument("--keep-denormals", action="store_true", help=KEEP_DENORMALS_HELP)
    b.set_defaults(func=cmd_bench)
