"""Reference exact attention: the explicit n x m score matrix, softmax, weighted sum.

Dimensions: B batch, H heads, N queries, M keys, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.dense.masks import merge_masks


def dense_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention computed in float32 (float64 inputs: float64) from the full score matrix.

    q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E]; mask broadcastable to [B, H, N, M]
    (True = may attend); causal aligns the queries with the last N keys; bias is added to the
    scores. A query with no key it may attend gets zeros. Returns [B, H, N, E] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(wide), k.to(wide)) * scale
    if bias is not None:
        scores = scores + bias.to(wide)
    keep = merge_masks(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
        any_key = keep.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~any_key, 0.0)
    weights = scores.softmax(dim=-1)
    if keep is not None:
        weights = weights * any_key
    out = torch.einsum("bhnm,bhme->bhne", weights, v.to(wide))
    return out.to(q.dtype)
