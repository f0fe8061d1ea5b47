"""Exact attention on the fused ``scaled_dot_product_attention`` kernel.

Dimensions: B batch, H heads, N queries, M keys, D head width, E value width.

Two details the kernel does not handle for us:
- causal attention of N queries against M >= N keys (XL memories, KV caches) is aligned to the
  *last* N keys; SDPA's ``is_causal`` aligns to the first, so that case gets an explicit mask;
- a query row whose keys are all masked makes the kernel return NaN; such rows are opened to
  every key for the kernel and their output is zeroed afterwards, so values and gradients stay
  finite in fp32, bf16 and fp16 (eagerly only when such a row exists; under torch.compile
  always, so that no host read breaks the graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.dense.masks import merge_masks


def cpu_flash_supported(x: Tensor) -> bool:
    """Whether the CPU flash kernels (``aten._scaled_dot_product_flash_attention_for_cpu`` and
    its backward, called directly by the blocked attention ops) run for tensors like ``x``."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16)


# Many small problems (at most SMALL_QUERIES queries against at most SMALL_KEYS keys each, such
# as Sinkhorn's buckets or Routing's clusters of 64) run faster on CPU as two batched matmuls
# around a softmax than through the flash kernels, whose per-tile work dominates there.
# In turn at 8K: SinkhornTransformerLM at its package defaults (buckets of 64 against 192
# keys) 1.086x, RoutingTransformerLM's clusters of 64 against 64 keys 1.022x; buckets of 128
# against 384 keys gained nothing (1.001x), hence the limits. The scores are formed (and
# kept for the backward pass), so only while a call's stay under SMALL_SCORE_BYTES.
SMALL_QUERIES = 64
SMALL_KEYS = 256
SMALL_SCORE_BYTES = 64 * 2**20


def _small_tiles(q: Tensor, k: Tensor) -> bool:
    n, m = q.shape[-2], k.shape[-2]
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and n <= SMALL_QUERIES
        and m <= SMALL_KEYS
        and q.shape[:-2].numel() * n * m * q.element_size() <= SMALL_SCORE_BYTES
        and not torch.compiler.is_compiling()
    )


def small_tile_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Unmasked attention as matmul, softmax, matmul (see SMALL_QUERIES); [..., N, E]."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.matmul(scores.softmax(dim=-1), v)


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
    # one causal query is the last position: it sees every key (a step of decoding needs no mask)
    causal = causal and not (n == 1 and m >= 1)
    if mask is None and bias is None and (not causal or n == m):
        if not causal and not dropout and _small_tiles(q, k):
            return small_tile_attention(q, k, v, scale)
        # The flash / memory-efficient kernels only run without an explicit mask.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout, scale=scale)
    keep = merge_masks(mask, causal, n, m, q.device)
    empty_rows = None
    if keep is not None:
        any_key = keep.any(dim=-1, keepdim=True)
        if torch.compiler.is_compiling() or q.device.type == "meta" or not bool(any_key.all()):
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
