"""Long-distance recall for ``longrange bench context``: pass key and associative recall with
every answer exactly 256, 1K, 4K or 16K tokens after the token it copies
(:func:`~longrange.data.synthetic.passkey_at_distance`,
:func:`~longrange.data.synthetic.recall_at_distance`).

Each family (:data:`~longrange.bench.context_variants.RECALL_MODELS`, local windows all below
256) is trained on fresh examples at one distance, ``RECALL_TRAIN_DISTANCE``, and tested on
held-out examples at every distance: whether its mechanism extrapolates from the distance it
was trained at is the point. Stateful families read each example in one call with a fresh
state (memorizing's memories reset per example); window families read it in one window. A
distance whose example is longer than what the family can read at once (its context, or its
kNN memory) is reported as out of reach with the reason, not run and not left out. Accuracy
is per answer token (a pass key digit: chance 10%; a recalled value: 1 in 128, or 1 in 8 for a
model that only knows which values the example holds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.bench.context_train import (
    Run,
    Schedule,
    autocast,
    calibrate_steps,
    close_state,
    make_run,
    train,
)
from longrange.bench.context_variants import ModelSpec, recall_reach
from longrange.data import synthetic
from longrange.data.samplers import IGNORE_INDEX

RECALL_DISTANCES = (256, 1024, 4096, 16384)
RECALL_TRAIN_DISTANCE = 256
RECALL_SCHEDULE = Schedule(batch_size=8, lr=3e-3)
RECALL_EVAL_EXAMPLES = 16
RECALL_EVAL_BATCH = 4
PAD_MULTIPLE = 64  # every recall model takes a multiple of 64 (buckets, windows, blocks of 32)

TaskFn = Callable[[int, int, int], tuple[Tensor, Tensor]]  # (batch, distance, seed)

RECALL_TASKS: dict[str, TaskFn] = {
    "passkey": lambda batch, distance, seed: synthetic.passkey_at_distance(
        batch, distance=distance, seed=seed
    ),
    "assoc": lambda batch, distance, seed: synthetic.recall_at_distance(
        batch, distance=distance, num_pairs=8, num_queries=8, seed=seed
    ),
}


def pad_to(inputs: Tensor, targets: Tensor, multiple: int = PAD_MULTIPLE) -> tuple[Tensor, Tensor]:
    """Right-pad to a multiple of ``multiple`` with ignored targets (causal models: the
    padding cannot reach a scored position)."""
    pad = (-inputs.shape[1]) % multiple
    if not pad:
        return inputs, targets
    return F.pad(inputs, (0, pad)), F.pad(targets, (0, pad), value=IGNORE_INDEX)


def example_length(task: str, distance: int) -> int:
    """Input tokens of one example of ``task`` at ``distance`` (before padding)."""
    return RECALL_TASKS[task](1, distance, 0)[0].shape[1]


def _train_seed(seed: int, step: int) -> int:
    return 1_000_003 * (seed + 1) + step


def _eval_seed(distance: int, batch: int) -> int:
    return 7_000_000 + 1000 * distance + batch  # one test set for every family and seed


def recall_run_factory(
    spec: ModelSpec, task: str, *, seed: int, device: torch.device | str, distance: int
) -> Callable[[int], Run]:
    if task not in RECALL_TASKS:
        raise ValueError(f"unknown recall task {task!r}; accepted: {', '.join(RECALL_TASKS)}")
    make = RECALL_TASKS[task]
    size = RECALL_SCHEDULE.batch_size

    def batches(index: int):
        inputs, targets = pad_to(*make(size, distance, _train_seed(seed, index)))
        return inputs, targets, None  # every example starts afresh (stateful: all rows reset)

    def factory(steps: int) -> Run:
        return make_run(spec, batches, schedule=RECALL_SCHEDULE, steps=steps, seed=seed, device=device)

    return factory


@torch.no_grad()
def recall_accuracy(run: Run, task: str, distance: int, *, examples: int = RECALL_EVAL_EXAMPLES) -> float:
    """Fraction of the answer tokens of ``examples`` held-out examples predicted right."""
    model, device = run.model, run.device
    model.eval()
    right = total = 0
    for b in range(0, examples, RECALL_EVAL_BATCH):
        size = min(RECALL_EVAL_BATCH, examples - b)
        inputs, targets = pad_to(*RECALL_TASKS[task](size, distance, _eval_seed(distance, b)))
        inputs, targets = inputs.to(device), targets.to(device)
        state = model.init_state(size, device) if run.spec.carries_state() else None
        try:
            with autocast(device):
                logits = model.forward_lm(inputs, state=state).logits
        finally:
            close_state(state)
        scored = targets != IGNORE_INDEX
        right += int(((logits.argmax(-1) == targets) & scored).sum())
        total += int(scored.sum())
    return right / total


def recall_point(
    family: str,
    spec: ModelSpec,
    task: str,
    *,
    budget_s: float,
    seed: int,
    device: torch.device | str,
    steps: int | None = None,
    distances: tuple[int, ...] = RECALL_DISTANCES,
    train_distance: int = RECALL_TRAIN_DISTANCE,
    examples: int = RECALL_EVAL_EXAMPLES,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``spec`` on ``task`` at ``train_distance`` for ``budget_s`` (or ``steps``) and
    test it at every distance; the row of the results JSON."""
    factory = recall_run_factory(spec, task, seed=seed, device=device, distance=train_distance)
    step_s = None
    if steps is None:
        steps, step_s = calibrate_steps(factory, budget_s)
    run = factory(steps)
    try:
        trained = train(run)
        reach, reason = recall_reach(spec)
        results = []
        for distance in distances:
            length = example_length(task, distance)
            cell: dict[str, Any] = {"distance": distance, "length": length}
            if reach is not None and length > reach:
                cell["reachable"] = False
                cell["reason"] = f"example of {length} tokens exceeds the {reason} ({reach})"
            else:
                cell["reachable"] = True
                cell["accuracy"] = recall_accuracy(run, task, distance, examples=examples)
            results.append(cell)
            if log:
                shown = f"{100 * cell['accuracy']:.1f}%" if cell["reachable"] else "out of reach"
                log(f"  {family:<16}{task:<9}{distance:>7}  {shown}")
    finally:
        run.close()
    return {
        "part": "recall",
        "family": family,
        "task": task,
        "seed": seed,
        "train_distance": train_distance,
        "budget_s": budget_s,
        "steps": steps,
        "calibrated_step_s": step_s,
        "train_s": trained["train_s"],
        "final_loss": trained["final_loss"],
        "batch_size": RECALL_SCHEDULE.batch_size,
        "lr": RECALL_SCHEDULE.lr,
        "eval_examples": examples,
        "reach": reach,
        "reach_kind": reason,
        "config": spec.config_dict(),
        "call_len": spec.call_len,
        "distances": results,
    }
