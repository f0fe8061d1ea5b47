"""Attention over retrieved memories without gathering them.

A kNN search returns, per query, K entry ids and their scores q · k. The attention over them
needs the scores (given: no key gathered in the forward pass), the weighted sum of their
values, and in the backward pass the weighted sums of keys (the query's gradient) and the
dot products of the output gradient with each value (the weights' gradient). All three are
one fused ``embedding_bag`` each over the memory's contiguous [rows * M, D] tables: nothing of
size [Q, K, D] is materialised, where gathering the pairs and multiplying them in batched
[1 x D] x [D x K] matmuls spent most of a memorizing layer's time.

The backward pass reads the tables again, after the memory may have overwritten slots it
retrieved (its FIFO wraps around, a cleared row refills). A :class:`TableLease` (kept by the
backward functions, so alive exactly as long as the graph) watches the retrieved slots: the
memory hands it the old pair of each watched slot before overwriting it, and the backward
pass corrects the few products that read an overwritten slot. Gradients are those of the
pairs as they were retrieved.

:func:`retrieved_attention_naive` gathers the pairs and uses einsum: the reference the tests
compare against.

Dimensions: Q queries (any leading shape), K retrieved entries per query, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class TableLease:
    """The old pairs of the slots a retrieval read that the memory has overwritten since
    (``before_write`` is the memory's hook); ``size`` slots in the tables, ``ids`` the read ones."""

    def __init__(self, size: int, ids: Tensor) -> None:
        self.watch = np.zeros(size, dtype=bool)
        self.watch[ids.reshape(-1).cpu().numpy()] = True
        self.slots: list[Tensor] = []
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def before_write(self, slots: np.ndarray, keys: Tensor, values: Tensor) -> None:
        """The memory is about to overwrite ``slots`` of the tables keys / values [rows, D]."""
        hit = slots[self.watch[slots]]
        if hit.size:
            index = torch.from_numpy(hit).to(keys.device)
            self.slots.append(index)
            self.keys.append(keys[index].clone())
            self.values.append(values[index].clone())
            self.watch[hit] = False  # the first overwrite holds the pair that was read

    def overwritten(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """For ids [P] (flat): the positions that read an overwritten slot, with that slot's id
        and its old key and value; None when nothing was overwritten."""
        if not self.slots:
            return None
        slots, order = torch.cat(self.slots).sort()
        at = torch.searchsorted(slots, ids).clamp_max(len(slots) - 1)
        where = (slots[at] == ids).nonzero().flatten()
        patch = order[at[where]]
        return where, ids[where], torch.cat(self.keys)[patch], torch.cat(self.values)[patch]


@dataclass
class Retrieved:
    """What a memory lookup returns for queries [..., D]: ``ids`` [..., K] (rows of the
    tables, 0 where nothing was found), ``scores`` [..., K] (the inner products with the
    queries), ``found`` [..., K], the tables ``keys`` / ``values`` [rows * M, D], and the lease
    that keeps the backward pass exact (None when no backward pass can follow)."""

    ids: Tensor
    scores: Tensor
    found: Tensor
    keys: Tensor
    values: Tensor
    lease: TableLease | None = None


class _Scores(torch.autograd.Function):
    """q · keys[ids] for queries q [Q, D], given as ``scores`` [Q, K] by the search; the
    backward pass sums the keys weighted by the scores' gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, scores: Tensor, ids: Tensor, keys: Tensor, lease) -> Tensor:
        ctx.save_for_backward(ids, keys)
        ctx.dtype, ctx.lease = q.dtype, lease
        return scores.to(q.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids, keys = ctx.saved_tensors
        grad = grad.to(keys.dtype)
        grad_q = F.embedding_bag(ids, keys, per_sample_weights=grad, mode="sum")
        changed = None if ctx.lease is None else ctx.lease.overwritten(ids.reshape(-1))
        if changed is not None:
            where, slots, old, _ = changed
            delta = grad.reshape(-1)[where, None] * (old - keys[slots])
            grad_q.index_add_(0, torch.div(where, ids.shape[1], rounding_mode="floor"), delta)
        return grad_q.to(ctx.dtype), None, None, None, None


class _Values(torch.autograd.Function):
    """Σ_k weights[q, k] values[ids[q, k]] for weights [Q, K] -> [Q, D]."""

    @staticmethod
    def forward(ctx, weights: Tensor, ids: Tensor, values: Tensor, lease) -> Tensor:
        q, k = ids.shape
        flat, offsets = ids.reshape(-1), torch.arange(0, q * k, k, device=ids.device)
        w = weights.reshape(-1).to(values.dtype)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(values, flat, offsets, False, 0, False, w)
        ctx.save_for_backward(flat, offsets, offset2bag, values)
        ctx.dtype, ctx.shape, ctx.lease = weights.dtype, weights.shape, lease
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, offsets, offset2bag, values = ctx.saved_tensors
        grad = grad.to(values.dtype)
        grad_w = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, values, flat, offsets, offset2bag, 0
        )
        changed = None if ctx.lease is None else ctx.lease.overwritten(flat)
        if changed is not None:
            where, slots, _, old = changed
            rows = torch.div(where, ctx.shape[-1], rounding_mode="floor")
            grad_w = grad_w.index_add(0, where, (grad[rows] * (old - values[slots])).sum(-1))
        return grad_w.view(ctx.shape).to(ctx.dtype), None, None, None


def memory_scores(q: Tensor, found: Retrieved) -> Tensor:
    """Inner products of queries q [..., D] with their retrieved keys -> [..., K]
    (differentiable in q; masking what was not found is the caller's)."""
    lead, k = q.shape[:-1], found.ids.shape[-1]
    scores = found.scores.masked_fill(~found.found, 0.0).reshape(-1, k)
    ids = found.ids.reshape(-1, k)
    out = _Scores.apply(q.reshape(-1, q.shape[-1]), scores, ids, found.keys, found.lease)
    return out.view(*lead, k)


def memory_values(weights: Tensor, found: Retrieved) -> Tensor:
    """Sum of the retrieved values weighted by ``weights`` [..., K] -> [..., D] (differentiable
    in the weights)."""
    lead, k = weights.shape[:-1], weights.shape[-1]
    out = _Values.apply(weights.reshape(-1, k), found.ids.reshape(-1, k), found.values, found.lease)
    return out.view(*lead, found.values.shape[-1]).to(weights.dtype)


def retrieved_attention_naive(q: Tensor, weights_fn, found: Retrieved) -> Tensor:
    """Reference: gather the pairs, score them with einsum, ``weights_fn(scores)`` -> weights,
    weighted sum of the gathered values."""
    keys = found.keys[found.ids] * found.found[..., None]
    values = found.values[found.ids] * found.found[..., None]
    scores = torch.einsum("...d,...kd->...k", q, keys.to(q.dtype))
    return torch.einsum("...k,...kd->...d", weights_fn(scores), values.to(q.dtype))
