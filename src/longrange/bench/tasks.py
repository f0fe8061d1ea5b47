"""``longrange bench recall`` and ``longrange bench quality``.

recall: each family is trained briefly, at one fixed budget, on freshly generated batches of
a synthetic task (MQAR, passkey, copying; ``longrange.data.synthetic``) and scored on held-out
seeds by the accuracy of its answers.

quality: each family is trained at one fixed budget on the built-in corpus and its validation
bits per byte reported.

Sequences are right-padded to a multiple of ``PAD_MULTIPLE`` with ignored targets, so families
that work on buckets or windows take them unchanged; the models are causal, so the padding
cannot reach the scored positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.data import synthetic
from longrange.data.samplers import IGNORE_INDEX
from longrange.models.registry import create_model, get_family

PAD_MULTIPLE = 128

TaskFn = Callable[[int, int], tuple[Tensor, Tensor]]  # (batch, seed) -> (inputs, targets)

TASKS: dict[str, TaskFn] = {
    "mqar": lambda batch, seed: synthetic.mqar(batch, num_pairs=16, num_queries=16, seed=seed),
    "copying": lambda batch, seed: synthetic.copying(batch, length=48, seed=seed),
    "passkey": lambda batch, seed: synthetic.passkey(
        batch,
        length=250,
        depth=float(torch.rand((), generator=torch.Generator().manual_seed(seed))),
        seed=seed,
    ),
}


def _pad(inputs: Tensor, targets: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    pad = (-inputs.shape[1]) % multiple
    if not pad:
        return inputs, targets
    return F.pad(inputs, (0, pad)), F.pad(targets, (0, pad), value=IGNORE_INDEX)


def _preset(family: str, preferred: str) -> str:
    presets = get_family(family).presets
    return preferred if preferred in presets else next(iter(presets))


def train_on_task(
    family: str,
    task: str,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    preset: str = "tiny",
    device: str = "cpu",
    eval_batches: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    make = TASKS[task]
    sample_inputs, _ = make(1, 0)
    length = sample_inputs.shape[1] + (-sample_inputs.shape[1]) % PAD_MULTIPLE
    torch.manual_seed(seed)
    model = create_model(family, _preset(family, preset), max_seq_len=max(length, 128)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        inputs, targets = _pad(*make(batch_size, 1_000_000 + step), PAD_MULTIPLE)
        out = model.forward_lm(inputs.to(device))
        loss = F.cross_entropy(
            out.logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE_INDEX
        )
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    train_s = time.perf_counter() - start
    model.eval()
    right = total = 0.0
    with torch.no_grad():
        for i in range(eval_batches):
            inputs, targets = _pad(*make(batch_size, i), PAD_MULTIPLE)
            logits = model.forward_lm(inputs.to(device)).logits
            scored = int((targets != IGNORE_INDEX).sum())
            right += synthetic.answer_accuracy(logits.cpu(), targets) * scored
            total += scored
    return {
        "family": family,
        "task": task,
        "steps": steps,
        "batch_size": batch_size,
        "length": length,
        "accuracy": right / total,
        "final_loss": loss.item(),
        "train_s": train_s,
    }


def quality_point(
    family: str, *, steps: int, preset: str = "tiny", device: str = "cpu", seq_len: int = 256, seed: int = 0
) -> dict[str, Any]:
    """Validation bits per byte on the built-in corpus after ``steps`` training steps."""
    import tempfile

    from longrange.train.config import TrainConfig
    from longrange.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=family,
            preset=_preset(family, preset),
            set={"max_seq_len": seq_len},
            seq_len=seq_len,
            batch_size=16,
            steps=steps,
            warmup=max(1, steps // 10),
            eval_every=steps,
            eval_tokens=65536,
            save_every=steps,
            device=device,
            out=out,
            name=family,
            sample_tokens=1,
            progress=False,
            seed=seed,
        )
        start = time.perf_counter()
        result = Trainer(cfg).fit()
        wall = time.perf_counter() - start
    return {
        "family": family,
        "preset": cfg.preset,
        "steps": steps,
        "seq_len": seq_len,
        "val_bpb": result["val_bpb_after"],
        "val_bpb_before": result["val_bpb_before"],
        "train_s": wall,
    }


def format_recall_table(rows: list[dict[str, Any]]) -> str:
    tasks = sorted({r["task"] for r in rows})
    families = list(dict.fromkeys(r["family"] for r in rows))
    head = f"{'family':<16}" + "".join(f"{t:>12}" for t in tasks)
    lines = [head, "-" * len(head)]
    for fam in families:
        cells = []
        for t in tasks:
            hit = [r for r in rows if r["family"] == fam and r["task"] == t]
            if not hit or "accuracy" not in hit[0]:
                cells.append(f"{'-':>12}")
            else:
                cells.append(f"{100 * hit[0]['accuracy']:>11.1f}%")
        lines.append(f"{fam:<16}" + "".join(cells))
    return "\n".join(lines)


def format_quality_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'family':<16}{'preset':>8}{'steps':>7}{'val bpb':>9}{'train s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['family']:<16}  {r['error']}")
            continue
        bpb = r["val_bpb"] if math.isfinite(r["val_bpb"]) else float("nan")
        lines.append(f"{r['family']:<16}{r['preset']:>8}{r['steps']:>7}{bpb:>9.3f}{r['train_s']:>9.0f}")
    return "\n".join(lines)
