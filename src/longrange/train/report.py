"""What a run leaves for people: metrics lines, the loss curve, the end-of-run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from longrange.atomic import atomic_write_bytes, named


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as err:
        raise named(err, path) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill; the run rewrites from its checkpoint
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records logged after the checkpoint we resume from."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


def plot_loss(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"] / math.log(2)) for r in metrics if r.get("train_loss") is not None]
    val = [(r["step"], r["val_bpb"]) for r in metrics if r.get("val_bpb") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (bits per byte)", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation bpb")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def summary_text(info: dict[str, Any], sample: str) -> str:
    width = 72
    lines = ["=" * width, "longrange train: done"]
    for key, value in info.items():
        lines.append(f"  {key:<22} {value}")
    lines.append("-" * width)
    lines.append("sample:")
    lines.append(sample)
    lines.append("=" * width)
    return "\n".join(lines)
