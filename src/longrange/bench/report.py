"""Plots and README tables from the recorded JSON under ``benchmarks/results/<device>/``.

``longrange bench report`` redraws every plot and rewrites the README section between the
``<!-- bench:start -->`` and ``<!-- bench:end -->`` markers, so the tables always come from
the JSON, never from hand edits.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from longrange.atomic import atomic_write_bytes
from longrange.bench.results import read_results

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# The fields the report reads of every row of a suite, and of every row without an error.
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "speed": (("family", "length"), ("fwd_bwd_s", "tokens_per_s")),
    "growth": (("family", "length", "base_length"), ("tokens_per_s", "vs_base")),
    "reference_defaults": (("family", "length"), ()),
    "knn": (("fill",), ()),
    "generate": (("family",), ()),
    "recall": (("family", "task"), ()),
    "quality": (("family",), ()),
    "listops": (("family",), ()),
}


def load_suite(folder: Path, suite: str) -> dict[str, Any] | None:
    """The suite's results in ``folder`` (None when it has none), refused with a ValueError
    naming the file when it cannot be reported whole."""
    path = folder / f"{suite}.json"
    if not path.exists():
        return None
    required, measured = FIELDS.get(suite, ((), ()))
    return read_results(path, required=required, measured=measured)


REFERENCE_SUFFIX = " (reference)"


def series_styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """Line style per plotted series, the same on every panel: one colour per family (vanilla
    thick black), and a family's reference package in its colour, dashed with square marks.
    Styles are fixed up front because panels skip series without data (the MFU panel has no
    reference lines), and matplotlib's colour cycle would then shift between panels."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    palette += ["tab:olive", "tab:cyan", "tab:gray"]
    bases = [label.removesuffix(REFERENCE_SUFFIX) for label in labels if label != "vanilla"]
    bases = list(dict.fromkeys(bases))
    colours = {base: palette[i % len(palette)] for i, base in enumerate(bases)}
    colours["vanilla"] = "black"
    styles = {}
    for label in labels:
        base = label.removesuffix(REFERENCE_SUFFIX)
        style: dict[str, Any] = {"color": colours[base], "marker": "o", "linestyle": "-"}
        if label != base:
            style.update(marker="s", linestyle="--")
        if label == "vanilla":
            style["linewidth"] = 2.5
        styles[label] = style
    return styles


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay out, write (90 dpi) and close a figure; ``rect`` the area the layout may fill."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=90)
    pyplot().close(fig)


def plot_speed(data: dict[str, Any], path: Path) -> None:
    rows = [r for r in data["results"] if "fwd_bwd_s" in r]
    if not rows:  # every point failed: nothing to draw, and a legend of no series is an error
        return
    plt = pyplot()
    families = list(dict.fromkeys(r["family"] for r in rows))
    styles = series_styles(families)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for fam in families:
        pts = sorted(
            (r["length"], r["fwd_bwd_s"], r.get("peak_mb"), r.get("mfu")) for r in rows if r["family"] == fam
        )
        style = styles[fam]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=fam, **style)
        mem = [(p[0], p[2]) for p in pts if p[2]]
        if mem:
            axes[1].plot(*zip(*mem), label=fam, **style)
        mfu = [(p[0], 100 * p[3]) for p in pts if p[3] is not None]
        if mfu:
            axes[2].plot(*zip(*mfu), label=fam, **style)
    for ax, title, ylabel in (
        (axes[0], "forward + backward time", "seconds"),
        (axes[1], "peak memory", "MB"),
        (axes[2], "model FLOP utilisation", "% of measured matmul peak"),
    ):
        ax.set_xscale("log", base=2)
        if ax is not axes[2]:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    fig.suptitle(data["environment"]["device"])
    save_figure(fig, path, rect=(0, 0.05 + 0.045 * math.ceil(len(labels) / 6), 1, 1))  # room for the legend


def _speed_markdown(data: dict[str, Any], cell=None, label=None) -> str:
    """One row per family, one column per length; ``cell(row)`` formats a measured point
    (default: fwd+bwd time / peak memory), ``label(length)`` a column's head."""
    rows = data["results"]
    lengths = sorted({r["length"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    out = ["| family | " + " | ".join(map(label or _length_label, lengths)) + " |"]
    out.append("|---" * (len(lengths) + 1) + "|")
    for fam in families:
        cells = []
        for n in lengths:
            hit = [r for r in rows if r["family"] == fam and r["length"] == n]
            if not hit:
                cells.append("")
            elif "error" in hit[0]:
                cells.append("fails")
            else:
                cells.append((cell or _time_memory_cell)(hit[0]))
        out.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _time_memory_cell(r: dict[str, Any]) -> str:
    mem = f" / {r['peak_mb']:.0f} MB" if r.get("peak_mb") else ""
    return f"{r['fwd_bwd_s']:.2f} s{mem}"


def _throughput_cell(r: dict[str, Any]) -> str:
    parts = [f"{r['tokens_per_s'] / 1000:.1f}K tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"{100 * r['mfu']:.0f}%")
    if r.get("growth") is not None:
        parts.append(f"n^{r['growth']:.2f}")
    if r.get("compiled_tokens_per_s"):
        parts.append(f"compiled {r['compiled_tokens_per_s'] / 1000:.1f}K")
    return ", ".join(parts)


def _recall_markdown(rows: list[dict[str, Any]]) -> str:
    tasks = sorted({r["task"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    length = {r["task"]: r.get("length") for r in rows}
    head = [f"{t} ({length[t]} tokens)" if length[t] else t for t in tasks]
    out = ["| family | " + " | ".join(head) + " |", "|---" * (len(tasks) + 1) + "|"]
    for fam in families:
        cells = []
        for task in tasks:
            hit = [r for r in rows if r["family"] == fam and r["task"] == task and "accuracy" in r]
            cells.append(f"{100 * hit[0]['accuracy']:.1f}%" if hit else "-")
        out.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _rows_markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """One table row per result; a failed point (an ``error`` row) shows "fails" where its
    figures would be, so that a family whose re-run failed stays in the table, as in speed's."""
    out = ["| " + " | ".join(c[1] for c in columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        cells = []
        missing = "fails" if "error" in r else "-"
        for key, _title, fmt in columns:
            value = r.get(key)
            cells.append(missing if value is None else format(value, fmt) if fmt else str(value))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _growth_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per base length: a family per row, tokens/s at the base, then tokens/s and
    the paired ratio at each longer length ("fails" where the family could not run)."""
    tables = []
    for base in sorted({r["base_length"] for r in rows}):

        def label(n: int, base: int = base) -> str:
            head = f"{_length_label(n)} tok/s"
            return head if n == base else f"{head} (vs {_length_label(base)})"

        mine = {"results": [r for r in rows if r["base_length"] == base]}
        tables.append(_speed_markdown(mine, _growth_cell, label))
    return "\n\n".join(tables)


def _growth_cell(r: dict[str, Any]) -> str:
    if r["length"] == r["base_length"]:
        return f"{r['tokens_per_s']:,.0f}"
    spread = r.get("vs_base_range")
    within = f", {spread[0]:.2f}-{spread[1]:.2f}" if spread and r.get("rounds", 0) > 1 else ""
    return f"{r['tokens_per_s']:,.0f} ({r['vs_base']:.2f}{within})"


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def _cached_points(rows: list[dict]) -> str:
    """The points of ``rows`` timed with the CPU allocation cache on, by family ("" if none):
    rows measured before it existed, or with --no-cpu-cache, ran on torch's allocator."""
    by_family: dict[str, set[int]] = {}
    for r in rows:
        if r.get("cpu_cache") == "on":  # a length once, however many rows it has
            # a reference-defaults setting "family/noncausal" reads as the package's defaults
            name = r["family"].replace("/noncausal", " (package defaults)")
            by_family.setdefault(name, set()).add(r["length"])
    return "; ".join(
        f"{family} at {', '.join(_length_label(n) for n in sorted(lengths))}"
        for family, lengths in sorted(by_family.items())
    )


def _peaks(speed: dict) -> str:
    """The matmul peak the MFU figures are relative to: each row's own, measured around its
    point (rows come from runs on different days; the machine's peak drifts between them)."""
    peaks = [r["matmul_peak_gflops"] for r in speed["results"] if r.get("matmul_peak_gflops")]
    if not peaks:
        return f"matmul peak {speed.get('environment', {}).get('matmul_peak_gflops', '?')} GFLOP/s"
    low, high = min(peaks), max(peaks)
    if round(low) == round(high):
        return f"matmul peak {low:.0f} GFLOP/s"
    return f"matmul peak measured around each point, {low:.0f}-{high:.0f} GFLOP/s"


def markdown_for_device(folder: Path) -> str:
    parts = []
    speed = load_suite(folder, "speed")
    env = (speed or {}).get("environment", {})
    parts.append(f"### {env.get('device', folder.name)}\n")
    if speed:
        parts.append(
            "Forward + backward time / peak memory, batch 1, dim 256, depth 4, heads 4 "
            f"(torch {env.get('torch', '?')}; {_peaks(speed)}):\n"
        )
        parts.append(_speed_markdown(speed) + "\n")
        cached = _cached_points(speed["results"])
        if cached:
            parts.append(f"Points timed with the CPU allocation cache (`longrange.cpu_cache`): {cached}.\n")
        parts.append(
            "Training throughput, model FLOP utilisation (of the matmul peak measured around each "
            "point) and the "
            "growth exponent of the time from the previous length:\n"
        )
        ours = {**speed, "results": [r for r in speed["results"] if "(reference)" not in r["family"]]}
        parts.append(_speed_markdown(ours, _throughput_cell) + "\n")
        if (folder / "speed.png").is_file():
            parts.append(f"![speed](benchmarks/results/{folder.name}/speed.png)\n")
    growth = load_suite(folder, "growth")
    if growth:
        parts.append(
            "Throughput at long inputs against a shorter base length, paired (`longrange bench "
            "growth`: each length of a family in one process, a forward + backward of each in "
            "turn, the ratio the median of the rounds' tokens/s ratios, then the smallest and largest; "
            "the growth exponents above come from lengths timed one after another):\n"
        )
        parts.append(_growth_markdown(growth["results"]) + "\n")
        cached = _cached_points(growth["results"])
        if cached:
            parts.append(f"Lengths timed with the CPU allocation cache: {cached}.\n")
    defaults = load_suite(folder, "reference_defaults")
    if defaults:
        from longrange.bench.reference import reference_defaults_markdown

        parts.append(
            "Reference-named classes at the reference's defaults, forward + backward, same run "
            "(each class and its comparison in one process, a step of each in turn, the speed-up "
            "the median of the rounds' ratios; the causal Performer reference's own row is timed "
            "alone). PerformerLM, RoutingTransformerLM and SinkhornTransformerLM are non-causal by "
            "their packages' defaults, so they are paired both ways:\n"
        )
        parts.append(reference_defaults_markdown(defaults) + "\n")
        cached = _cached_points(defaults["results"])
        if cached:
            parts.append(f"Pairs timed with the CPU allocation cache on both sides: {cached}.\n")
    knn = load_suite(folder, "knn")
    if knn:
        parts.append(
            "Memorizing's kNN memory as it fills (reference defaults at the benchmark size, one "
            "512-token chunk forward + backward; every fill in one process, a chunk of each in "
            "turn, vs empty the median of the same round's ratios; recall@k of the index against "
            "exact search):\n"
        )
        cols = [
            ("fill", "memories", ","),
            ("chunk_s", "chunk s", ".3f"),
            ("relative_to_empty", "vs empty", ".2f"),
            ("index", "index", ""),
            ("recall_at_k", "recall@k", ".3f"),
            ("reference_chunk_s", "reference s", ".3f"),
            ("speedup", "speed-up", ".2f"),
            ("reference_recall_at_k", "reference recall@k", ".3f"),
        ]
        filled = sorted((r for r in knn["results"] if "error" not in r), key=lambda r: r["fill"])
        parts.append(_rows_markdown(filled, cols) + "\n")
    gen = load_suite(folder, "generate")
    if gen:
        first = gen["results"][0] if gen["results"] else {}
        prompt, new = first.get("prompt_len", "?"), first.get("new_tokens", "?")
        parts.append(f"Decoding, {new} new tokens after a {prompt}-token prompt (tokens/s):\n")
        cols = [
            ("family", "family", ""),
            ("incremental_tokens_per_s", "incremental", ".1f"),
            ("recompute_tokens_per_s", "full recompute", ".1f"),
            ("speedup", "speed-up", ".1f"),
        ]
        if any("compiled_tokens_per_s" in r for r in gen["results"]):
            cols += [("compiled_tokens_per_s", "compiled", ".1f"), ("compile_s", "compile s", ".0f")]
        parts.append(_rows_markdown(gen["results"], cols) + "\n")
    recall = load_suite(folder, "recall")
    if recall:
        first = recall["results"][0] if recall["results"] else {}
        parts.append(f"Synthetic recall accuracy after {first.get('steps', '?')} training steps:\n")
        parts.append(_recall_markdown(recall["results"]) + "\n")
    quality = load_suite(folder, "quality")
    if quality:
        parts.append("Validation bits per byte on the built-in corpus after a fixed budget:\n")
        cols = [
            ("family", "family", ""),
            ("preset", "preset", ""),
            ("steps", "steps", ""),
            ("val_bpb", "val bpb", ".3f"),
        ]
        parts.append(_rows_markdown(quality["results"], cols) + "\n")
    listops = load_suite(folder, "listops")
    if listops:
        parts.append("ListOps (Long Range Arena) accuracy after a fixed budget (chance 10%):\n")
        cols = [
            ("family", "family", ""),
            ("min_length", "min chars", ""),
            ("max_length", "max chars", ""),
            ("steps", "steps", ""),
            ("accuracy", "accuracy", ".3f"),
        ]
        parts.append(_rows_markdown(listops["results"], cols) + "\n")
    return "\n".join(parts)


def write_report(results_dir: str | Path = "benchmarks/results", readme: str | Path = "README.md") -> str:
    check_readme(readme, START, END)
    body = report_markdown(results_dir)
    write_readme_block(readme, START, END, body)
    return body


def report_markdown(results_dir: str | Path = "benchmarks/results") -> str:
    """Redraw the speed plots and return the README block for every device folder."""
    root = Path(results_dir)
    if not root.is_dir():  # a report from elsewhere would blank the README's tables
        raise ValueError(
            f"no results folder {str(results_dir)!r}: run the report from the repository root, or "
            "name the folder with --out"
        )
    sections = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        with malformed_as_value_error(folder):
            speed = load_suite(folder, "speed")
            if speed:
                plot_speed(speed, folder / "speed.png")
            sections.append(markdown_for_device(folder))
    return "\n".join(sections) if sections else "_No results recorded yet._\n"


@contextlib.contextmanager
def malformed_as_value_error(folder: Path):
    """A results file that is JSON with the expected fields but values a table cannot show
    (a hand edit: a time given as text, a curve that is not a list) fails the report with one
    ValueError naming the folder, not a traceback from deep in the formatting."""
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
        if isinstance(err, ValueError) and str(folder) in str(err):
            raise  # already names its file
        raise ValueError(f"results in {folder} cannot be reported: {type(err).__name__}: {err}") from None


def check_readme(readme: str | Path, start: str, end: str) -> None:
    """Refuse a README that is not a file, or whose ``start`` / ``end`` markers are not one
    pair in that order: rewriting the block would then fail, or delete what lies between a
    lone marker and the block."""
    readme = Path(readme)
    if readme.exists() and not readme.is_file():
        raise ValueError(f"--readme {str(readme)!r} is not a file")
    text = readme.read_text() if readme.is_file() else ""
    starts, ends = text.count(start), text.count(end)
    if (starts, ends) == (0, 0):
        return
    if (starts, ends) != (1, 1) or text.index(end) < text.index(start):
        raise ValueError(
            f"--readme {str(readme)!r} must hold {start} and {end} once each, in that order, or "
            f"neither; it holds {starts} and {ends}: fix the markers by hand"
        )


def write_readme_block(
    readme: str | Path, start: str, end: str, body: str, *, after: str | None = None
) -> None:
    """Put ``body`` between the ``start`` and ``end`` markers of ``readme`` (atomically):
    in place of what they held, else right after the line ``after`` when it is there, else
    at the end of the file (:func:`check_readme` refuses markers that are not one pair)."""
    check_readme(readme, start, end)
    readme = Path(readme)
    text = readme.read_text() if readme.is_file() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    elif after is not None and after in text:
        head, rest = text.split(after, 1)
        text = head + after + "\n\n" + block + rest
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_bytes(readme, text.encode("utf-8"))
