"""From sort scores to a reordering of key buckets: Sinkhorn balancing and differentiable top-k.

Two ways to turn a score matrix ``scores [..., R, C]`` (R sorted slots, C candidate buckets)
into the buckets each slot draws from:

- :func:`gumbel_sinkhorn` (Mena et al. 2018, used by Tay et al. 2020): log-space alternating
  row / column normalisation of ``(log(scores + eps) + gumbel) / temperature``. For a square
  matrix the result is doubly stochastic (a soft permutation) and approaches a hard
  permutation as the temperature falls. The Gumbel noise is drawn only when asked for (the
  layers ask in training only, so evaluation is deterministic).
- :func:`differentiable_topk` (the references' ``non_permutative`` mode): each slot picks its
  ``k`` best columns one after the other; a pick's weight is its softmax probability among
  the columns not picked yet. The indices are hard, the weights carry the gradient back to
  the scores. The sparse result (indices, weights) is what the fast attention gathers with;
  :func:`dense_selection` writes it as the dense matrix the naive reference multiplies with.

Dimensions: R rows (sorted slots), C columns (candidate buckets), K picks per row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_gumbel(
    shape: tuple[int, ...], *, like: Tensor, eps: float = 1e-6, generator: torch.Generator | None = None
) -> Tensor:
    """Standard Gumbel noise ``-log(-log(u + eps) + eps)`` with u ~ U(0, 1)."""
    u = torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator)
    return -torch.log(-torch.log(u + eps) + eps)


def sinkhorn_normalize(log_r: Tensor, n_iters: int) -> Tensor:
    """Alternate row (last dim) and column (second to last dim) normalisation in log space,
    ``n_iters`` times each; returns ``exp`` of the result, [..., R, C]."""
    for _ in range(n_iters):
        log_r = log_r - torch.logsumexp(log_r, dim=-1, keepdim=True)
        log_r = log_r - torch.logsumexp(log_r, dim=-2, keepdim=True)
    return log_r.exp()


def gumbel_sinkhorn(
    scores: Tensor,
    *,
    n_iters: int,
    temperature: float,
    noise: bool,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Soft permutation from non-negative scores [..., R, C] -> [..., R, C].

    ``noise`` adds Gumbel noise before the temperature (training); without it the result is a
    deterministic function of the scores.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_r = torch.log(scores + eps)
    if noise:
        log_r = log_r + sample_gumbel(tuple(log_r.shape), like=log_r, eps=eps, generator=generator)
    return sinkhorn_normalize(log_r / temperature, n_iters)


def differentiable_topk(
    scores: Tensor, k: int, *, temperature: float = 1.0, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pick ``k`` columns per row: scores [..., R, C] -> (indices [..., R, K], weights [..., R, K]).

    Pick i is the best column not picked before; its weight is its probability under
    ``softmax(scores / temperature)`` restricted to the columns not picked before. ``valid``
    (bool, broadcastable to the scores) removes columns from the candidates; at least ``k``
    columns per row must remain valid, or the extra picks fall on invalid columns.
    """
    if k < 1 or k > scores.shape[-1]:
        raise ValueError(f"k must lie in [1, {scores.shape[-1]}] (the number of columns), got {k}")
    x = scores / temperature
    if valid is not None:
        x = x.masked_fill(~valid, torch.finfo(x.dtype).min)
    indices, weights = [], []
    for i in range(k):
        prob, idx = x.softmax(dim=-1).max(dim=-1, keepdim=True)
        indices.append(idx)
        weights.append(prob)
        if i < k - 1:
            x = x.scatter(-1, idx, float("-inf"))
    return torch.cat(indices, dim=-1), torch.cat(weights, dim=-1)


def dense_selection(indices: Tensor, weights: Tensor, n_cols: int) -> Tensor:
    """The picks as a matrix: indices, weights [..., R, K] -> [..., R * K, C] where row
    ``r * K + i`` holds ``weights[r, i]`` at column ``indices[r, i]`` (zero elsewhere)."""
    *lead, rows, k = indices.shape
    out = weights.new_zeros(*lead, rows, k, n_cols)
    out = out.scatter(-1, indices[..., None], weights[..., None])
    return out.reshape(*lead, rows * k, n_cols)
