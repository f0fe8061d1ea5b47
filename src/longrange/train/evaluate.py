"""Validation bits per byte: each held-out document read in order.

Families that carry state (``model.carries_state``) read each document chunk by chunk with
their state carried and reset at document starts; the others see each chunk on its own, so
their context is at most one chunk. With byte tokens, bits per token is bits per byte.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from longrange.data.corpus import Document
from longrange.data.samplers import eval_chunks
from longrange.models.base import LongRangeLM


def autocast_context(device: torch.device, precision: str):
    if precision in ("fp32", "float32"):
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_bpb(
    model: LongRangeLM,
    docs: list[Document],
    *,
    seq_len: int,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 16,
) -> float:
    """Bits per byte over (the first ``max_tokens`` predicted tokens of) ``docs``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    chunks = eval_chunks(docs, seq_len, max_tokens)
    state = None
    try:
        with autocast_context(device, precision):
            if model.carries_state:
                for new_doc, inputs, targets in chunks:
                    if new_doc:
                        close_state(state)  # a document's memory files go as soon as it ends
                        state = model.init_state(1, device)
                    out = model.forward_lm(inputs.to(device), state=state)
                    state = out.state
                    total_nats += float(
                        F.cross_entropy(
                            out.logits.float().flatten(0, 1),
                            targets.to(device).flatten(),
                            reduction="sum",
                        )
                    )
                    total_tokens += targets.numel()
            else:
                pending: list[tuple[torch.Tensor, torch.Tensor]] = []
                for _new_doc, inputs, targets in chunks:
                    pending.append((inputs, targets))
                    if len(pending) == batch_size:
                        total_nats, total_tokens = _flush(model, pending, device, total_nats, total_tokens)
                        pending = []
                total_nats, total_tokens = _flush(model, pending, device, total_nats, total_tokens)
    finally:
        close_state(state)
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no validation tokens to evaluate")
    return total_nats / total_tokens / math.log(2)


def close_state(state) -> None:
    """Release what a state holds outside Python (the Memorizing family's memory files)."""
    close = getattr(state, "close", None)
    if close is not None:
        close()


def _flush(model, pending, device, total_nats, total_tokens):
    """Run chunks of equal length together; others one by one."""
    by_len: dict[int, list] = {}
    for inputs, targets in pending:
        by_len.setdefault(inputs.shape[1], []).append((inputs, targets))
    for group in by_len.values():
        inputs = torch.cat([g[0] for g in group]).to(device)
        targets = torch.cat([g[1] for g in group]).to(device)
        logits = model.forward_lm(inputs).logits.float()
        total_nats += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        total_tokens += targets.numel()
    return total_nats, total_tokens
