"""Shared-key/value attention on the fused ``scaled_dot_product_attention`` kernel.

The one key/value head is expanded to every query head as a view (no copy here). Folding the
heads into the query axis instead ([B, 1, H*N, D]) runs as fast forward but the CPU flash
kernel's backward parallelises over batch x heads only, so with one block (B*H = 1) its
backward is several times slower; enable_gqa is slower still. The causal band is cached per
shape, so that the many calls of one forward share one mask tensor (saved once by autograd).

Dimensions: B batch, H query heads, N queries, M keys, D head width.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.lru_cache(maxsize=16)
def causal_band(n: int, m: int, device: torch.device) -> Tensor:
    """[N, M] bool: query i (at key position M - N + i) sees keys j <= M - N + i."""
    return torch.arange(m, device=device)[None, :] <= torch.arange(n, device=device)[:, None] + (m - n)


def shared_kv_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Same contract as :func:`shared_kv_attention_naive`: q [B, H, N, D], k/v [B, M, D],
    key_mask [B, M] -> [B, H, N, D]."""
    b, h, n, _ = q.shape
    m = k.shape[-2]
    kh, vh = k[:, None].expand(b, h, m, -1), v[:, None].expand(b, h, m, -1)
    mask = causal_band(n, m, q.device) if causal and n > 1 else None
    empty_rows = None
    if key_mask is not None:
        keys = key_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
        any_key = mask.any(dim=-1, keepdim=True)
        if not bool(any_key.all()):
            # A row with no key would come back NaN: open it for the kernel, zero it after.
            empty_rows = ~any_key
            mask = mask | empty_rows
    out = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def shared_kv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "sdpa",
) -> Tensor:
    """Shared-key/value attention; ``backend`` is "sdpa" (fused, default) or "naive"."""
    if backend == "sdpa":
        return shared_kv_attention_sdpa(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
    if backend == "naive":
        from longrange.ops.blockrec.naive import shared_kv_attention_naive

        return shared_kv_attention_naive(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
    raise ValueError(f"backend must be 'sdpa' or 'naive', got {backend!r}")
