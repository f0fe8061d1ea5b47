"""Training for ``longrange bench context``: a wall-clock budget turned into a step count, and
the two kinds of runs the suite trains (language model on the built-in corpus, synthetic
recall).

The budget is seconds of training per run. To keep runs reproducible it is not enforced as a
deadline: :func:`calibrate_steps` times a few steps of the configuration on this machine (after
one warm-up step, on a throwaway model) and converts the budget into a fixed number of steps,
and both numbers are recorded with every result. Two runs with the same spec, seed and steps
see the same batches in the same order and start from the same weights.

Language-model runs follow the trainer's data rules: window families train on random windows
of ``seq_len + 1`` bytes of the concatenated training documents
(:class:`~longrange.data.samplers.RandomWindows`); families that carry state read each batch
row's documents in order (:class:`~longrange.data.samplers.DocumentChunks`), state carried
from step to step and reset on the rows that start a document. A row of a step may be fed in
several ``forward_lm`` calls (``ModelSpec.call_len``), the state passed between them inside one
graph, so the gradient is that of one call over the row. Optimiser: AdamW (betas 0.9, 0.95, no
weight decay), linear warm-up over the first tenth of the steps, cosine decay to a tenth of
the peak, gradients clipped at 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.bench.context_variants import ModelSpec
from longrange.data.corpus import Document
from longrange.data.samplers import IGNORE_INDEX, DocumentChunks, RandomWindows


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings shared by every run of a part."""

    batch_size: int
    lr: float
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def lr_at(self, step: int, steps: int) -> float:
        warmup = max(1, round(self.warmup_fraction * steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as the trainer's "auto" precision); fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def close_state(state: Any) -> None:
    """Release what a carried state holds outside Python (memorizing's memory files)."""
    close = getattr(state, "close", None)
    if close is not None:
        close()


def forward_nats(
    model: nn.Module, inputs: Tensor, targets: Tensor, state: Any, call_len: int | None
) -> tuple[Tensor, Tensor | None, Any]:
    """Per-position loss [B, N] in nats (0 at ignored targets), the summed auxiliary loss and
    the state after the row, feeding ``inputs`` in calls of ``call_len`` tokens."""
    step = call_len or inputs.shape[1]
    parts, aux = [], None
    for start in range(0, inputs.shape[1], step):
        out = model.forward_lm(inputs[:, start : start + step], state=state)
        state = out.state
        part = targets[:, start : start + step]
        nats = F.cross_entropy(
            out.logits.float().transpose(1, 2), part, ignore_index=IGNORE_INDEX, reduction="none"
        )
        parts.append(nats)
        if out.aux_loss is not None:
            aux = out.aux_loss if aux is None else aux + out.aux_loss
    return torch.cat(parts, dim=1), aux, state


@dataclass
class Run:
    """A model, its optimiser and its batches; :meth:`step` does one optimiser step."""

    spec: ModelSpec
    model: nn.Module
    schedule: Schedule
    steps: int
    device: torch.device
    batches: Callable[[int], tuple[Tensor, Tensor, Tensor | None]]
    state: Any = None
    done: int = 0
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.schedule.lr, betas=(0.9, 0.95), weight_decay=0.0
        )

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(self.done, self.steps)
        self.model.train()
        inputs, targets, new_rows = self.batches(self.done)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        state = self.state
        if self.spec.carries_state():
            if state is None:
                state = self.model.init_state(inputs.shape[0], self.device)
            rows = new_rows if new_rows is not None else torch.ones(inputs.shape[0], dtype=torch.bool)
            state = self.model.reset_state_rows(state, rows.to(self.device))
        with autocast(self.device):
            nats, aux, state = forward_nats(self.model, inputs, targets, state, self.spec.call_len)
        scored = (targets != IGNORE_INDEX).sum().clamp(min=1)
        loss = nats.sum() / scored
        total = loss if aux is None else loss + aux
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.schedule.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.schedule.grad_clip)
        self.optimizer.step()
        self.state = self.model.detach_state(state) if self.spec.carries_state() else None
        self.done += 1
        return loss.item()

    def close(self) -> None:
        close_state(self.state)
        self.state = None


def lm_batches(
    spec: ModelSpec, train_docs: list[Document], *, seq_len: int, batch_size: int, seed: int
) -> Callable[[int], tuple[Tensor, Tensor, Tensor | None]]:
    """Batch ``i`` of a language-model run: (inputs, targets, rows starting a document)."""
    if spec.carries_state():
        sampler = DocumentChunks(train_docs, seq_len=seq_len, batch_size=batch_size, seed=seed)

        def chunk(_index: int):
            c = sampler.next()
            return c.inputs, c.targets, c.new_doc

        return chunk
    stream = np.concatenate([d.tokens for d in train_docs]) if train_docs else np.zeros(0, np.uint8)
    windows = RandomWindows(stream, seq_len=seq_len, batch_size=batch_size, seed=seed)

    def window(index: int):
        rows = windows.batch(index)
        return rows[:, :-1], rows[:, 1:], None

    return window


def make_run(
    spec: ModelSpec,
    batches: Callable[[int], tuple[Tensor, Tensor, Tensor | None]],
    *,
    schedule: Schedule,
    steps: int,
    seed: int,
    device: torch.device | str,
) -> Run:
    """A fresh run: the weights depend only on the spec and the seed."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    return Run(spec, model, schedule, steps, device, batches)


def calibrate_steps(
    factory: Callable[[int], Run], budget_s: float, *, probe_steps: int = 3, max_steps: int = 100_000
) -> tuple[int, float]:
    """(steps, seconds per step): ``budget_s`` of training as a step count on this machine,
    timed over ``probe_steps`` steps after one warm-up step of a throwaway run."""
    if not budget_s > 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget_s!r}")
    run = factory(max_steps)
    try:
        run.step()
        start = time.perf_counter()
        for _ in range(probe_steps):
            run.step()
        step_s = (time.perf_counter() - start) / probe_steps
    finally:
        run.close()
    return max(1, min(max_steps, int(budget_s / step_s))), step_s


def train(
    run: Run,
    *,
    eval_every: int | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``run`` to its step count. With ``evaluate``, evaluate every ``eval_every`` steps
    and after the last: the curve of (step, training seconds, value); the evaluation time is
    not counted as training."""
    curve: list[dict[str, float]] = []
    train_s, losses = 0.0, []

    def point() -> None:
        value = evaluate(run.model)
        curve.append({"step": run.done, "train_s": round(train_s, 3), "bpb": value})
        if log:
            log(f"  step {run.done:>6}  {train_s:7.1f} s  val bpb {value:.3f}")

    while run.done < run.steps:
        start = time.perf_counter()
        losses.append(run.step())
        train_s += time.perf_counter() - start
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{run.spec.family}: the training loss is not finite at step {run.done}")
        if evaluate is not None and (run.done == run.steps or (eval_every and run.done % eval_every == 0)):
            point()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"train_s": train_s, "final_loss": sum(tail) / len(tail), "curve": curve}
