"""Reference shared-key/value attention: every head's score matrix written out in float32
(float64 inputs: float64).

Dimensions: B batch, H query heads, N queries, M keys, D head width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.blockrec.inputs import check_shared_kv_inputs


def shared_kv_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """q: [B, H, N, D]; k, v: [B, M, D] (one head shared by all query heads);
    key_mask: [B, M] bool, True = may attend; causal: query i sits at key position M - N + i
    and sees keys up to it. A query with no key it may attend gets zeros. -> [B, H, N, D]."""
    check_shared_kv_inputs(q, k, v, key_mask, causal, scale)
    n, m = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhnd,bmd->bhnm", q.to(wide), k.to(wide)) * scale
    keep = torch.ones(n, m, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + m - n
    keep = keep[None, None]
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    scores = scores.masked_fill(~keep, float("-inf"))
    any_key = keep.any(dim=-1, keepdim=True)
    weights = scores.masked_fill(~any_key, 0.0).softmax(dim=-1) * any_key
    return torch.einsum("bhnm,bmd->bhnd", weights, v.to(wide)).to(q.dtype)
