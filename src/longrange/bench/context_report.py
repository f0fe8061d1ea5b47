"""Tables, plots and the README section of ``longrange bench context``, from
``benchmarks/results/<device>/context.json`` only.

``longrange bench report`` (and the suite itself) redraws ``context_position.png`` (bits per
byte against position in the document, log x, one line per family; dashed past what the family
can see) and ``context_compute.png`` (validation bits per byte against training seconds), and
rewrites the README between ``<!-- bench-context:start -->`` and ``<!-- bench-context:end -->``
(placed after the main benchmark block when missing).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from longrange.bench.report import (
    check_readme,
    malformed_as_value_error,
    pyplot,
    save_figure,
    series_styles,
    write_readme_block,
)
from longrange.bench.results import read_results
from longrange.models.registry import FAMILIES

START, END = "<!-- bench-context:start -->", "<!-- bench-context:end -->"
AFTER = "<!-- bench:end -->"


def load_context(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / "context.json"
    return read_results(path, required=("part",)) if path.exists() else None


def _rows(data: dict[str, Any], part: str) -> list[dict[str, Any]]:
    """The rows of one part, vanilla first and the families in the registry's order."""
    order = {name: i for i, name in enumerate(FAMILIES)}
    rows = [r for r in data.get("results", []) if r.get("part") == part and "error" not in r]
    return sorted(rows, key=lambda r: order.get(r.get("family"), len(order)))


def _span(lo: int, hi: int) -> str:
    def size(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{size(lo)}-{size(hi)}"


def _families(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["family"] for r in rows))


# --- plots ----------------------------------------------------------------------------------------
def draw_context_plots(data: dict[str, Any] | None, folder: Path) -> list[Path]:
    """Draw the position and compute plots that the JSON has rows for; return their paths."""
    if not data:
        return []
    plt = pyplot()
    written = []
    position = _rows(data, "position")
    if position:
        styles = series_styles(_families(position))
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for row in position:
            style = {k: v for k, v in styles[row["family"]].items() if k != "linestyle"}
            reach = row.get("reach")
            pts = [(math.sqrt(c["start"] * c["end"]), c["bpb"], c["end"]) for c in row["position_curve"]]
            inside = [p for p in pts if reach is None or p[2] <= reach]
            past = [p for p in pts if reach is not None and p[2] >= reach]
            ax.plot([p[0] for p in inside], [p[1] for p in inside], label=row["family"], **style)
            if past:
                joined = inside[-1:] + [p for p in past if p not in inside]
                ax.plot([p[0] for p in joined], [p[1] for p in joined], linestyle=":", **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the document (bytes before the predicted one)")
        ax.set_ylabel("bits per byte")
        ax.set_title("validation loss by position (dotted: past the family's reach)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
        path = Path(folder) / "context_position.png"
        save_figure(fig, path)
        written.append(path)
    compute = [r for r in _rows(data, "compute") if r.get("train_curve")]
    if compute:
        styles = series_styles(_families(compute))
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for row in compute:
            pts = [(p["train_s"], p["bpb"]) for p in row["train_curve"]]
            ax.plot(*zip(*pts, strict=True), label=row["family"], **styles[row["family"]])
        ax.set_xlabel("training seconds")
        ax.set_ylabel(f"validation bits per byte ({compute[0].get('curve_documents')} documents)")
        ax.set_title(f"equal compute at {compute[0].get('context')} bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        path = Path(folder) / "context_compute.png"
        save_figure(fig, path)
        written.append(path)
    return written


# --- tables ---------------------------------------------------------------------------------------
def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _reach(row: dict[str, Any]) -> str:
    reach = row.get("reach")
    if reach is None:
        return "whole document (state)"
    return f"{reach} bytes" + (" (memory)" if row.get("stateful") else " (window)")


def position_table(rows: list[dict[str, Any]]) -> str:
    spans = [(b["start"], b["end"]) for b in rows[0]["buckets"]]
    body = []
    for r in rows:
        cells = [r["family"], _reach(r), str(r["steps"])]
        for b in r["buckets"]:
            value = "-" if b["bpb"] is None else f"{b['bpb']:.3f}"
            cells.append(f"({value})" if b.get("beyond_reach") and b["bpb"] is not None else value)
        cells.append(f"**{r['bpb']:.3f}**")
        body.append(cells)
    head = ["family", "sees back", "steps", *(_span(lo, hi) for lo, hi in spans), "overall"]
    return _table(head, body)


def ablation_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (family, ablation): mean bpb on and off over the seeds both sides have,
    the per-seed differences off - on (positive: the mechanism helps) and their spread."""
    out = []
    for family, name in dict.fromkeys((r["family"], r["ablation"]) for r in rows):
        mine = [r for r in rows if r["family"] == family and r["ablation"] == name]
        on = {r["seed"]: r for r in mine if r["side"] == "on"}
        off = {r["seed"]: r for r in mine if r["side"] == "off"}
        seeds = sorted(set(on) & set(off))
        if not seeds:
            continue
        diffs = [off[s]["bpb"] - on[s]["bpb"] for s in seeds]
        first = off[seeds[0]]
        out.append(
            {
                "family": family,
                "ablation": name,
                "mechanism": first["mechanism"],
                "on_label": on[seeds[0]]["label"],
                "off_label": first["label"],
                "seeds": seeds,
                "on_bpb": statistics.fmean(on[s]["bpb"] for s in seeds),
                "off_bpb": statistics.fmean(off[s]["bpb"] for s in seeds),
                "diffs": diffs,
                "diff": statistics.fmean(diffs),
                "spread": statistics.stdev(diffs) if len(diffs) > 1 else None,
                "steps": first["steps"],
                "on_train_s": statistics.fmean(on[s]["train_s"] for s in seeds),
                "off_train_s": statistics.fmean(off[s]["train_s"] for s in seeds),
            }
        )
    return out


def ablation_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for a in ablation_summary(rows):
        spread = "-" if a["spread"] is None else f"{a['spread']:.3f}"
        per_seed = ", ".join(f"{d:+.3f}" for d in a["diffs"])
        body.append(
            [
                a["family"],
                a["mechanism"],
                a["on_label"],
                a["off_label"],
                f"{a['on_bpb']:.3f}",
                f"{a['off_bpb']:.3f}",
                f"**{a['diff']:+.3f}**",
                f"{spread} ({per_seed})",
                f"{a['steps']} ({a['on_train_s']:.0f} s / {a['off_train_s']:.0f} s)",
            ]
        )
    head = ["family", "mechanism", "on", "off", "bpb on", "bpb off", "off - on", "sd (per seed)"]
    return _table([*head, "steps (s on / off)"], body)


def _recall_cell(cell: dict[str, Any]) -> str:
    if not cell.get("reachable"):
        return "out of reach"
    return f"{100 * cell['accuracy']:.1f}%"


def recall_table(rows: list[dict[str, Any]]) -> str:
    distances = sorted({c["distance"] for r in rows for c in r["distances"]})
    body = []
    for r in rows:
        cells = {c["distance"]: _recall_cell(c) for c in r["distances"]}
        reach = "unbounded (state)" if r["reach"] is None else f"{r['reach']} ({r['reach_kind']})"
        row = [r["family"], r["task"], str(r["steps"]), reach]
        row += [cells.get(d, "-") + (" (trained)" if d == r["train_distance"] else "") for d in distances]
        body.append(row)
    head = ["family", "task", "steps", "reads at once", *(_span(0, d).split("-")[1] for d in distances)]
    return _table(head, body)


def compute_table(rows: list[dict[str, Any]]) -> str:
    base = next((r["bpb"] for r in rows if r["family"] == "vanilla"), None)
    body = []
    for r in rows:
        diff = "-" if base is None or r["family"] == "vanilla" else f"{r['bpb'] - base:+.3f}"
        body.append([r["family"], str(r["steps"]), f"{r['train_s']:.0f}", f"{r['bpb']:.3f}", diff])
    return _table(["family", "steps", "training s", "val bpb", "vs vanilla"], body)


def format_context_tables(data: dict[str, Any] | None) -> str:
    if not data:
        return "_No context results recorded yet._"
    parts = []
    for part, title, make in (
        ("position", "Bits per byte by position in the document", position_table),
        ("ablation", "Each mechanism against its ablation", ablation_table),
        ("recall", "Recall accuracy by distance", recall_table),
        ("compute", "Equal compute", compute_table),
    ):
        rows = _rows(data, part)
        if rows:
            parts.append(f"{title}:\n\n{make(rows)}\n")
    return "\n".join(parts) if parts else "_No context results recorded yet._"


# --- the README section ---------------------------------------------------------------------------
def _latest_run(data: dict[str, Any]) -> dict[str, Any] | None:
    runs = sorted(_rows(data, "run"), key=lambda r: r.get("measured_at", ""))
    full = [r for r in runs if set(r["parts"].split(",")) >= {"position", "ablation", "recall", "compute"}]
    return (full or runs or [None])[-1]


def budget_line(data: dict[str, Any]) -> str:
    steps = {r["family"]: r["steps"] for r in _rows(data, "position") + _rows(data, "compute")}
    recall = {(r["family"], r["task"]): r["steps"] for r in _rows(data, "recall")}
    run = _latest_run(data)
    text = []
    if run:
        if run["budget_s"]:
            budget = f"{run['budget_s']:g} s of training per language-model run"
            if run.get("recall_budget_s"):
                budget += f" and {run['recall_budget_s']:g} s per recall run"
        else:
            budget = f"{run['steps']} steps per run"
        text.append(
            f"Budget: {budget} (torch threads: {run.get('threads', '?')}); the run of "
            f"{run['measured_at'][:10]} ({run['parts']}; seeds {', '.join(map(str, run['seeds']))}) took "
            f"{run['wall_s'] / 60:.0f} minutes."
        )
    if steps:
        text.append("Steps per language-model run: " + ", ".join(f"{f} {n}" for f, n in steps.items()) + ".")
    if recall:
        text.append(
            "Steps per recall run: " + ", ".join(f"{f} {t} {n}" for (f, t), n in recall.items()) + "."
        )
    return " ".join(text)


def family_facts(data: dict[str, Any]) -> list[str]:
    """One line per family of what its rows say, numbers only (generated, so it stays true)."""
    position = {r["family"]: r for r in _rows(data, "position")}
    compute = {r["family"]: r for r in _rows(data, "compute")}
    ablations = ablation_summary(_rows(data, "ablation"))
    recall = _rows(data, "recall")
    families = list(dict.fromkeys([*position, *compute, *(a["family"] for a in ablations)]))
    families += [f for f in _families(recall) if f not in families]
    lines = []
    for family in families:
        said = []
        if family in position:
            reached = [
                b for b in position[family]["buckets"] if b["bpb"] is not None and not b["beyond_reach"]
            ]
            if len(reached) > 1:
                first, last = reached[0], reached[-1]
                said.append(
                    f"{first['bpb']:.3f} bpb at positions {_span(first['start'], first['end'])}, "
                    f"{last['bpb']:.3f} at {_span(last['start'], last['end'])} "
                    f"({last['bpb'] - first['bpb']:+.3f})"
                )
        for a in (a for a in ablations if a["family"] == family):
            helped = sum(d > 0 for d in a["diffs"])
            said.append(
                f"{a['mechanism']}: {a['off_label']} gives {a['diff']:+.3f} bpb "
                f"(worse than with it on {helped} of {len(a['diffs'])} seeds)"
            )
        for r in (r for r in recall if r["family"] == family):
            cells = ", ".join(
                f"{_recall_cell(c)} at {_span(0, c['distance']).split('-')[1]}" for c in r["distances"]
            )
            said.append(f"{r['task']} {cells}")
        if family in compute and family != "vanilla" and "vanilla" in compute:
            said.append(
                f"{compute[family]['bpb'] - compute['vanilla']['bpb']:+.3f} bpb against vanilla at equal time"
            )
        if said:
            lines.append(f"- **{family}**: " + "; ".join(said) + ".")
    return lines


def markdown_context(folder: Path) -> str:
    data = load_context(folder)
    if not data:
        return ""
    env = data.get("environment", {})
    parts = [f"### {env.get('device', folder.name)}\n", budget_line(data) + "\n"]
    tables = format_context_tables(data)
    parts.append(tables + "\n")
    for name, alt in (("context_position.png", "position"), ("context_compute.png", "compute")):
        if (folder / name).is_file():
            parts.append(f"![{alt}](benchmarks/results/{folder.name}/{name})\n")
    vanilla = [r for r in _rows(data, "recall") if r["family"] == "vanilla"]
    for r in vanilla:
        trained = next((c for c in r["distances"] if c["distance"] == r["train_distance"]), None)
        if trained and trained.get("reachable") and trained["accuracy"] < 0.9:
            parts.append(
                f"**Warning**: vanilla reached only {100 * trained['accuracy']:.1f}% on {r['task']} at "
                f"its trained distance ({r['train_distance']}); the recall budget is too small to "
                "measure anything.\n"
            )
    facts = family_facts(data)
    if facts:
        parts.append(
            "What the rows say, family by family (generated from the JSON):\n\n" + "\n".join(facts) + "\n"
        )
    return "\n".join(parts)


def write_context_report(
    results_dir: str | Path = "benchmarks/results", readme: str | Path = "README.md"
) -> str:
    """Redraw the plots of every device folder and rewrite the README's context block."""
    check_readme(readme, START, END)
    body = context_markdown(results_dir)
    write_readme_block(readme, START, END, body, after=AFTER)
    return body


def context_markdown(results_dir: str | Path = "benchmarks/results") -> str:
    """Redraw the plots of every device folder and return the README's context block."""
    root = Path(results_dir)
    sections = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        with malformed_as_value_error(folder):
            data = load_context(folder)
            if data:
                draw_context_plots(data, folder)
                sections.append(markdown_context(folder))
    return "\n".join(sections) if sections else "_No context results recorded yet._\n"
