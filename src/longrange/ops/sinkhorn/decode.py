"""One decoding step of causal Sinkhorn attention, against caches of past keys and values.

A new query at position p of a head group whose buckets start at ``offset`` (0, or S - 1 for
the shifted heads) lies in bucket u = (p - offset) // S. It sees the P buckets its bucket
picked when the bucket began (null buckets or earlier key buckets, each scaled by its weight)
and the keys of its own bucket up to itself, the same keys the full forward gives it. A
shifted head's positions before ``offset`` see only the keys from 0 up to themselves.
The work per step is O((P + 1) * S * D), whatever the prefix length.

Dimensions: B batch, H heads, L cached positions, P picks (null buckets), S bucket size,
D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.dense import dense_attention


def picked_buckets(
    cache: Tensor, null: Tensor, indices: Tensor, weights: Tensor, *, offset: int, bucket_size: int
) -> Tensor:
    """cache [B, H, L, X], null [H, X], indices / weights [B, H, P] (column c < P: the null
    bucket, P + j: the bucket starting at ``offset + j * S``) -> [B, H, P * S, X], scaled."""
    b, h, _, x = cache.shape
    p, s = indices.shape[-1], bucket_size
    is_null = indices < p
    start = offset + (indices - p).clamp_min(0) * s  # [B, H, P]
    pos = (start[..., None] + torch.arange(s, device=cache.device)).reshape(b, h, p * s)
    pos = pos.clamp_max(cache.shape[2] - 1)  # null picks read anything, then take the null
    got = cache.gather(2, pos[..., None].expand(b, h, p * s, x)).reshape(b, h, p, s, x)
    got = torch.where(is_null[..., None, None], null[None, :, None, None, :].to(got.dtype), got)
    return (got * weights[..., None, None].to(got.dtype)).reshape(b, h, p * s, x)


def causal_sinkhorn_step(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    null_k: Tensor,
    null_v: Tensor,
    *,
    indices: Tensor | None,
    weights: Tensor | None,
    position: int,
    offset: int,
    bucket_size: int,
    scale: float | None = None,
    picked: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """q [B, H, 1, D] at ``position``; caches [B, H, >= position + 1, D or E] holding the new
    key and value; indices / weights [B, H, P] of the current bucket (None before
    ``offset``); ``picked``: the current bucket's :func:`picked_buckets` of the key and value
    caches when the caller keeps them (they change only when a bucket begins: a decoder
    forms them once a bucket, not once a token). Returns [B, H, 1, E]."""
    rel = position - offset
    if rel < 0:
        keys, values = k_cache[:, :, : position + 1], v_cache[:, :, : position + 1]
    else:
        start = offset + (rel // bucket_size) * bucket_size
        own_k, own_v = k_cache[:, :, start : position + 1], v_cache[:, :, start : position + 1]
        if picked is None:
            common = dict(offset=offset, bucket_size=bucket_size)
            picked = (
                picked_buckets(k_cache, null_k, indices, weights, **common),
                picked_buckets(v_cache, null_v, indices, weights, **common),
            )
        keys, values = torch.cat([picked[0], own_k], dim=2), torch.cat([picked[1], own_v], dim=2)
    return dense_attention(q, keys, values, scale=scale)
