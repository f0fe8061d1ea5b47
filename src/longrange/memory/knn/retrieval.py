"""Attention over retrieved memories without gathering them.

A kNN search returns, per query, K entry ids and their scores q · k. The attention over them
needs the scores (given: no key gathered in the forward pass), the weighted sum of their
values, and in the backward pass the weighted sums of keys (the query's gradient) and the
dot products of the output gradient with each value (the weights' gradient). All three are
one fused ``embedding_bag`` each over the memory's contiguous [rows * M, D] tables: nothing of
size [Q, K, D] is materialised, where gathering the pairs and multiplying them in batched
[1 x D] x [D x K] matmuls spent most of a memorizing layer's time.

:func:`retrieved_attention_naive` gathers the pairs and uses einsum: the reference the tests
compare against.

Dimensions: Q queries (any leading shape), K retrieved entries per query, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Retrieved:
    """What a memory lookup returns for queries [..., D]: ``ids`` [..., K] (rows of the
    tables, 0 where nothing was found), ``scores`` [..., K] (the inner products with the
    queries), ``found`` [..., K], and the tables ``keys`` / ``values`` [rows * M, D]."""

    ids: Tensor
    scores: Tensor
    found: Tensor
    keys: Tensor
    values: Tensor


class _Scores(torch.autograd.Function):
    """q · keys[ids] for queries q [Q, D], given as ``scores`` [Q, K] by the search; the
    backward pass sums the keys weighted by the scores' gradient."""

    @staticmethod
    def forward(ctx, q: Tensor, scores: Tensor, ids: Tensor, keys: Tensor) -> Tensor:
        ctx.save_for_backward(ids, keys)
        ctx.dtype = q.dtype
        return scores.to(q.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids, keys = ctx.saved_tensors
        grad_q = F.embedding_bag(ids, keys, per_sample_weights=grad.to(keys.dtype), mode="sum")
        return grad_q.to(ctx.dtype), None, None, None


def memory_scores(q: Tensor, found: Retrieved) -> Tensor:
    """Inner products of queries q [..., D] with their retrieved keys -> [..., K]
    (differentiable in q; -inf... masking is the caller's)."""
    lead, k = q.shape[:-1], found.ids.shape[-1]
    scores = found.scores.masked_fill(~found.found, 0.0).reshape(-1, k)
    out = _Scores.apply(q.reshape(-1, q.shape[-1]), scores, found.ids.reshape(-1, k), found.keys)
    return out.view(*lead, k)


def memory_values(weights: Tensor, found: Retrieved) -> Tensor:
    """Sum of the retrieved values weighted by ``weights`` [..., K] -> [..., D] (differentiable
    in the weights)."""
    lead, k = weights.shape[:-1], weights.shape[-1]
    table = found.values
    out = F.embedding_bag(
        found.ids.reshape(-1, k), table, per_sample_weights=weights.reshape(-1, k).to(table.dtype), mode="sum"
    )
    return out.view(*lead, table.shape[-1]).to(weights.dtype)


def retrieved_attention_naive(q: Tensor, weights_fn, found: Retrieved) -> Tensor:
    """Reference: gather the pairs, score them with einsum, ``weights_fn(scores)`` -> weights,
    weighted sum of the gathered values."""
    keys = found.keys[found.ids] * found.found[..., None]
    values = found.values[found.ids] * found.found[..., None]
    scores = torch.einsum("...d,...kd->...k", q, keys.to(q.dtype))
    return torch.einsum("...k,...kd->...d", weights_fn(scores), values.to(q.dtype))
