"""Exact attention on the fused ``scaled_dot_product_attention`` kernel.

Dimensions: B batch, H heads, N queries, M keys, D head width, E value width.

Two details the kernel does not handle for us:
- causal attention of N queries against M >= N keys (XL memories, KV caches) is aligned to the
  *last* N keys; SDPA's ``is_causal`` aligns to the first, so that case gets an explicit mask;
- a query row whose keys are all masked makes the kernel return NaN; such rows are opened to
  every key for the kernel and their output is zeroed afterwards, so values and gradients stay
  finite in fp32, bf16 and fp16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(n: int, m: int, device: torch.device | None = None) -> Tensor:
    """[N, M] boolean mask: query i (at absolute position m - n + i) sees keys j <= m - n + i."""
    offset = m - n
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    return cols <= rows + offset


def merge_masks(mask: Tensor | None, causal: bool, n: int, m: int, device: torch.device) -> Tensor | None:
    """Combine a padding/attention mask with the causal band; None when nothing is masked."""
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
    if not causal:
        return mask
    band = causal_mask(n, m, device)
    return band if mask is None else mask & band


def dense_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Same contract as :func:`dense_attention_naive`, on the fused kernel.

    q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E] -> [B, H, N, E].
    """
    n, m = q.shape[-2], k.shape[-2]
    if mask is None and bias is None and (not causal or n == m):
        # The flash / memory-efficient kernels only run without an explicit mask.
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and n > 1, dropout_p=dropout, scale=scale
        )
    keep = merge_masks(mask, causal, n, m, q.device)
    empty_rows = None
    if keep is not None:
        any_key = keep.any(dim=-1, keepdim=True)
        if not bool(any_key.all()):
            empty_rows = ~any_key
            keep = keep | empty_rows
    if bias is None:
        attn_mask = keep
    else:
        attn_mask = bias.to(q.dtype)
        if keep is not None:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    backend: str = "sdpa",
) -> Tensor:
    """Exact attention; ``backend`` is "sdpa" (fused, the default) or "naive" (reference)."""
    if backend == "sdpa":
        return dense_attention_sdpa(
            q, k, v, mask=mask, causal=causal, bias=bias, scale=scale, dropout=dropout
        )
    if backend == "naive":
        if dropout:
            raise ValueError("dropout is only supported by backend='sdpa'")
        from longrange.ops.dense.naive import dense_attention_naive

        return dense_attention_naive(q, k, v, mask=mask, causal=causal, bias=bias, scale=scale)
    raise ValueError(f"backend must be 'sdpa' or 'naive', got {backend!r}")
