"""Position-wise validation loss for ``longrange bench context``.

Each validation document of at least ``MIN_DOC_BYTES`` is read in order and the loss of every
byte is kept by its position in the document (the number of bytes before it), up to
``MAX_POSITION``:

- families that carry state read the document in calls (``ModelSpec.call_len``, else the
  trained context) with one state carried from the first byte to the last;
- the others read it through a sliding window of their trained context: the first window
  scores its bytes with all the context there is; each later window, ``stride`` further on,
  scores only the bytes no earlier window scored, so every byte is scored once, with at least
  ``window - stride + 1`` bytes of context.

Bits per byte is reported per position bucket and overall. Each bucket keeps its summed nats
and its byte count, so the overall figure is exactly the count-weighted mean of the buckets
(:func:`combine`). The curve for the plot uses finer, doubling position bins.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.bench.context_train import autocast, close_state
from longrange.data.corpus import Document

BUCKETS: tuple[tuple[int, int], ...] = ((0, 256), (256, 1024), (1024, 4096), (4096, 16384))
MAX_POSITION = BUCKETS[-1][1]
MIN_DOC_BYTES = 8192
CURVE_EDGES = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
WINDOW_BATCH = 4


def eval_documents(docs: list[Document], *, min_bytes: int = MIN_DOC_BYTES) -> list[Document]:
    """The validation documents of at least ``min_bytes``, cut to the first ``MAX_POSITION``
    bytes (positions 1 .. MAX_POSITION - 1 are scored)."""
    long = [Document(d.name, d.tokens[:MAX_POSITION]) for d in docs if len(d) >= min_bytes]
    if not long:
        raise ValueError(f"no validation document has at least {min_bytes} bytes")
    return long


def _nats(model: nn.Module, inputs: Tensor, targets: Tensor, state: Any = None) -> tuple[Tensor, Any]:
    out = model.forward_lm(inputs, state=state)
    nats = F.cross_entropy(out.logits.float().transpose(1, 2), targets, reduction="none")
    return nats, out.state


@torch.no_grad()
def stateful_nats(model: nn.Module, tokens: Tensor, *, call_len: int, device: torch.device) -> Tensor:
    """Loss [N - 1] of bytes 1 .. N - 1 of one document, one state carried through it."""
    tokens = tokens.to(device)
    n = tokens.shape[0] - 1
    state = model.init_state(1, device)
    parts = []
    try:
        with autocast(device):
            for start in range(0, n, call_len):
                stop = min(start + call_len, n)
                nats, state = _nats(
                    model, tokens[None, start:stop], tokens[None, start + 1 : stop + 1], state
                )
                parts.append(nats[0])
    finally:
        close_state(state)
    return torch.cat(parts).double().cpu()


def window_plan(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, stop, first scored) of each window over predictions 0 .. n - 1: a window reads
    inputs start .. stop - 1 and scores predictions first .. stop - 1."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must lie in [1, window={window}], got {stride}")
    plan, done, start = [(0, min(window, n), 0)], min(window, n), stride
    while done < n:
        stop = min(start + window, n)
        plan.append((start, stop, done))
        done, start = stop, start + stride
    return plan


@torch.no_grad()
def window_nats(
    model: nn.Module, tokens: Tensor, *, window: int, stride: int, device: torch.device
) -> Tensor:
    """Loss [N - 1] of bytes 1 .. N - 1 of one document under the sliding window."""
    tokens = tokens.to(device)
    n = tokens.shape[0] - 1
    out = torch.empty(n, dtype=torch.float64)
    plan = window_plan(n, window, stride)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for item in plan:
        groups.setdefault(item[1] - item[0], []).append(item)
    with autocast(device):
        for items in groups.values():
            for b in range(0, len(items), WINDOW_BATCH):
                batch = items[b : b + WINDOW_BATCH]
                inputs = torch.stack([tokens[s:e] for s, e, _ in batch])
                targets = torch.stack([tokens[s + 1 : e + 1] for s, e, _ in batch])
                nats, _ = _nats(model, inputs, targets)
                for row, (s, e, first) in enumerate(batch):
                    out[first:e] = nats[row, first - s :].double().cpu()
    return out


def bucket_sums(nats: Tensor, edges: tuple[tuple[int, int], ...]) -> list[tuple[float, int]]:
    """(summed nats, count) of the bytes at positions [lo, hi) for each (lo, hi); ``nats[i]``
    is the loss of the byte at position i + 1."""
    positions = torch.arange(1, nats.shape[0] + 1)
    out = []
    for lo, hi in edges:
        keep = (positions >= lo) & (positions < hi)
        out.append((float(nats[keep].sum()), int(keep.sum())))
    return out


def combine(buckets: list[dict[str, Any]]) -> float:
    """Overall bits per byte from buckets: their bpb weighted by their byte counts."""
    filled = [b for b in buckets if b["count"]]
    if not filled:
        raise ValueError("no scored bytes in the buckets")
    return sum(b["bpb"] * b["count"] for b in filled) / sum(b["count"] for b in filled)


def position_eval(
    model: nn.Module,
    docs: list[Document],
    *,
    stateful: bool,
    window: int,
    stride: int,
    call_len: int | None,
    device: torch.device | str,
    reach: int | None,
) -> dict[str, Any]:
    """Bits per byte by position bucket, overall, and the curve, over ``docs`` (as given:
    see :func:`eval_documents`). ``reach``: how far back the family can see (None: no limit);
    a bucket past it is marked ``"beyond_reach"``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    edges = tuple(itertools.pairwise(CURVE_EDGES))
    totals = np.zeros((len(BUCKETS), 2))
    curve_totals = np.zeros((len(edges), 2))
    try:
        for doc in docs:
            tokens = torch.from_numpy(doc.tokens[:MAX_POSITION].astype(np.int64))
            if stateful:
                nats = stateful_nats(model, tokens, call_len=call_len or window, device=device)
            else:
                nats = window_nats(model, tokens, window=window, stride=stride, device=device)
            totals += np.array(bucket_sums(nats, BUCKETS))
            curve_totals += np.array(bucket_sums(nats, edges))
    finally:
        model.train(was_training)
    buckets = []
    for (lo, hi), (nats, count) in zip(BUCKETS, totals, strict=True):
        row: dict[str, Any] = {"start": lo, "end": hi, "count": int(count), "nats": float(nats)}
        row["bpb"] = float(nats / count / math.log(2)) if count else None
        row["beyond_reach"] = reach is not None and hi > reach
        buckets.append(row)
    curve = [
        {"start": lo, "end": hi, "count": int(count), "bpb": float(nats / count / math.log(2))}
        for (lo, hi), (nats, count) in zip(edges, curve_totals, strict=True)
        if count
    ]
    total_nats, total_count = totals[:, 0].sum(), totals[:, 1].sum()
    return {
        "bpb": float(total_nats / total_count / math.log(2)),
        "bytes": int(total_count),
        "documents": len(docs),
        "buckets": buckets,
        "position_curve": curve,
    }
