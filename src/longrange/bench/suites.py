"""The suites behind ``longrange bench``: each runs, prints its table and merges its rows into
``benchmarks/results/<device>/<suite>.json`` (rows of other families and lengths are kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longrange.bench.device import environment
from longrange.bench.results import check_writable, merge_results, results_path
from longrange.bench.speed import format_table, memory_in_fresh_process, run_speed_suite, stamp

SUITES = ("speed", "growth", "memory", "generate", "recall", "quality", "listops", "context", "knn", "report")


def run_memory_suite(families, lengths, *, device, batch_size=1, out_dir="benchmarks/results"):
    rows = []
    for family in families:
        for length in sorted(lengths):
            mb = memory_in_fresh_process(family, length, device=device, batch_size=batch_size)
            row = {"family": family, "length": length, "batch_size": batch_size, "peak_mb": mb}
            if mb is None:
                row["error"] = "failed (out of memory or a length the configuration refuses)"
            rows.append(stamp(row))
            print(f"{family:<16}{length:>8}{'-' if mb is None else f'{mb:.0f} MB':>12}", flush=True)
    path = results_path(out_dir, device, "memory")
    merge_results(path, environment(device), rows)
    print(f"written: {path}")
    return rows


def run_generate_suite(
    families, *, device, prompt_len=1024, new_tokens=1024, compile=False, out_dir="benchmarks/results"
):
    from longrange.bench.generate import format_generate_table, generate_point

    rows = []
    for family in families:
        try:
            row = generate_point(
                family, device=device, prompt_len=prompt_len, new_tokens=new_tokens, compile=compile
            )
        except (RuntimeError, ValueError) as err:
            # with its key fields, so that it replaces the family's earlier row at this setting
            row = {"family": family, "prompt_len": prompt_len, "new_tokens": new_tokens}
            row["error"] = str(err)[:200]
        rows.append(stamp(row))
        print(format_generate_table([row]).splitlines()[-1], flush=True)
    path = results_path(out_dir, device, "generate")
    merge_results(path, environment(device), rows, keys=("family", "prompt_len", "new_tokens"))
    print(format_generate_table(rows) + f"\nwritten: {path}")
    return rows


def run_recall_suite(families, *, device, tasks=None, steps=300, out_dir="benchmarks/results"):
    from longrange.bench.tasks import TASKS, format_recall_table, train_on_task

    rows = []
    for family in families:
        for task in tasks or list(TASKS):
            try:
                row = train_on_task(family, task, steps=steps, device=device)
            except (RuntimeError, ValueError) as err:
                row = {"family": family, "task": task, "error": str(err)[:200]}
            rows.append(stamp(row))
            acc = row.get("accuracy")
            print(f"{family:<16}{task:<10}{'-' if acc is None else f'{100 * acc:.1f}%':>8}", flush=True)
    path = results_path(out_dir, device, "recall")
    merge_results(path, environment(device), rows, keys=("family", "task"))
    print(format_recall_table(rows) + f"\nwritten: {path}")
    return rows


def run_quality_suite(families, *, device, steps=200, preset="tiny", out_dir="benchmarks/results"):
    from longrange.bench.tasks import format_quality_table, quality_point

    rows = []
    for family in families:
        try:
            row = quality_point(family, steps=steps, preset=preset, device=device)
        except (RuntimeError, ValueError) as err:
            row = {"family": family, "error": str(err)[:200]}
        rows.append(stamp(row))
    path = results_path(out_dir, device, "quality")
    merge_results(path, environment(device), rows, keys=("family",))
    print(format_quality_table(rows) + f"\nwritten: {path}")
    return rows


def run_listops_suite(
    families, *, device, steps=300, min_length=500, max_length=2000, out_dir="benchmarks/results"
):
    from longrange.bench.listops import train_listops

    rows = []
    for family in families:
        try:
            row = train_listops(
                family, steps=steps, min_length=min_length, max_length=max_length, device=device
            )
        except (RuntimeError, ValueError) as err:
            row = {"family": family, "task": "listops", "max_length": max_length, "error": str(err)[:200]}
        rows.append(stamp(row))
        acc = row.get("accuracy")
        print(f"{family:<16}listops {min_length}-{max_length}", end="", flush=True)
        print(f"{'-' if acc is None else f'{100 * acc:.1f}%':>8}", flush=True)
    path = results_path(out_dir, device, "listops")
    merge_results(path, environment(device), rows, keys=("family", "max_length"))
    print(f"written: {path}")
    return rows


# The results files each suite merges its rows into (``speed --compare-reference`` adds
# reference_defaults); knn always writes under the CPU's folder.
WRITES = {suite: (suite,) for suite in SUITES if suite != "report"}


def _positive(options: dict[str, Any], key: str, flag: str) -> None:
    value = options.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")


def check_suite_options(suite: str, families: list[str], lengths: list[int], options: dict[str, Any]) -> None:
    """Refuse bad input before any work: an unknown suite, no family or one named twice,
    counts that are not positive, a length named twice, lengths the memory suite cannot
    measure (the other suites check their own)."""
    if suite not in SUITES:
        raise ValueError(f"unknown bench suite {suite!r}; accepted: {', '.join(SUITES)}")
    if suite not in ("knn", "report"):
        if not families:
            raise ValueError("--models names no family; give 'all' or comma-separated families")
        twice = sorted({f for f in families if families.count(f) > 1})
        if twice:
            raise ValueError(f"--models names {', '.join(twice)} more than once")
    for key, flag in (
        ("steps", "--steps"),
        ("batch_size", "--batch-size"),
        ("prompt_len", "--prompt-len"),
        ("new_tokens", "--new-tokens"),
    ):
        _positive(options, key, flag)
    if suite == "memory" and (not lengths or any(n < 2 for n in lengths)):
        raise ValueError(f"--lengths must be integers >= 2, got {lengths}")
    if suite in ("speed", "memory", "knn"):  # growth refuses its own
        twice = sorted({n for n in lengths if lengths.count(n) > 1})
        if twice:  # each would be measured twice into two rows of one key
            raise ValueError(f"--lengths names {', '.join(map(str, twice))} more than once")


def run_suite(suite: str, families: list[str], lengths: list[int], *, device: str, options: dict[str, Any]):
    check_suite_options(suite, families, lengths, options)
    out_dir = options.get("out", "benchmarks/results")
    if suite in WRITES:
        written = WRITES[suite] + (("reference_defaults",) if options.get("compare_reference") else ())
        check_writable(out_dir, "cpu" if suite == "knn" else device, written)
    if suite == "speed":
        return run_speed_suite(
            families,
            lengths,
            device=device,
            repeats=options.get("repeats", 3),
            batch_size=options.get("batch_size", 1),
            out_dir=out_dir,
            memory=not options.get("no_memory", False),
            compare_reference=options.get("compare_reference", False),
            reference_lengths=options.get("reference_lengths"),
            compile=options.get("compile", False),
        )
    if suite == "growth":
        from longrange.bench.growth import run_growth_suite

        return run_growth_suite(
            families, lengths, device=device, repeats=options.get("repeats", 3), out_dir=out_dir
        )
    if suite == "memory":
        return run_memory_suite(
            families, lengths, device=device, batch_size=options.get("batch_size", 1), out_dir=out_dir
        )
    if suite == "generate":
        return run_generate_suite(
            families,
            device=device,
            prompt_len=options.get("prompt_len", 1024),
            new_tokens=options.get("new_tokens", 1024),
            compile=options.get("compile", False),
            out_dir=out_dir,
        )
    if suite == "recall":
        return run_recall_suite(families, device=device, steps=options.get("steps") or 300, out_dir=out_dir)
    if suite == "quality":
        return run_quality_suite(families, device=device, steps=options.get("steps") or 200, out_dir=out_dir)
    if suite == "listops":
        low, high = options.get("listops_length", (500, 2000))
        return run_listops_suite(
            families,
            device=device,
            steps=options.get("steps") or 300,
            min_length=low,
            max_length=high,
            out_dir=out_dir,
        )
    if suite == "context":
        from longrange.bench import context_suite as ctx

        def given(key, default):
            return default if options.get(key) is None else options[key]

        return ctx.run_context_suite(
            families,
            device=device,
            parts=tuple(given("parts", ctx.PARTS)),
            budget_s=given("budget", ctx.DEFAULT_BUDGET_S),
            recall_budget_s=given("recall_budget", ctx.DEFAULT_RECALL_BUDGET_S),
            seeds=tuple(given("seeds", ctx.DEFAULT_SEEDS)),
            steps=options.get("steps"),
            out_dir=out_dir,
        )
    if suite == "knn":  # memorizing's kNN memory as it fills; --lengths are the fills
        from longrange.bench.knn import run_knn_suite

        return run_knn_suite(
            lengths,
            repeats=options.get("repeats", 3),
            compare_reference=options.get("compare_reference", False),
            out_dir=out_dir,
        )
    if suite == "report":
        from longrange.bench import context_report, report

        readme = options.get("readme", "README.md")
        # both blocks made (every results file read) and both markers checked before either
        # block is written, so a bad file or marker leaves the README as it was
        report.check_readme(readme, report.START, report.END)
        report.check_readme(readme, context_report.START, context_report.END)
        body, context = report.report_markdown(out_dir), context_report.context_markdown(out_dir)
        report.write_readme_block(readme, report.START, report.END, body)
        report.write_readme_block(
            readme, context_report.START, context_report.END, context, after=context_report.AFTER
        )
        print(body)
        print(context)
        return []
    raise ValueError(f"unknown bench suite {suite!r}; accepted: {', '.join(SUITES)}")


__all__ = ["SUITES", "Path", "format_table", "run_suite"]
