"""Local attention on FlexAttention: the window rules as a block mask over the whole sequence.

The block mask lets the compiled kernel skip every tile of the [N, N] score matrix that lies
outside the band, so no span gather is needed. Each query's window is an interval of key
positions (:func:`longrange.ops.local.naive.window_bounds`), looked up inside ``mask_mod``;
the shared_qk exception (a query keeps its own key when it sees nothing else) is decided per
query beforehand by counting the kept keys of its interval with a prefix sum.

The fused kernel needs ``torch.compile``; ``compiled=False`` runs FlexAttention's unfused
reference (O(N^2) memory), which is only good for checking the masks on small inputs.
Rotary positions are applied over the whole sequence here, so position scales that grow with
distance (xPos) belong on the blocked backend.

Dimensions: B batch, H heads, N positions, C window size, K keys per span, D head width,
E value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from longrange.ops.local.naive import Rotary, span_columns, window_bounds

_COMPILED_FLEX = None


def compiled_flex_attention():
    """``torch.compile``d FlexAttention, built on first use."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def alone_queries(keys_kept: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """keys_kept: [B, H, N]; lo, hi: [N] -> [B, H, N], True where a query's window keeps no key
    but its own."""
    kept = keys_kept.int()
    counts = F.pad(kept.cumsum(dim=-1), (1, 0))  # counts[..., j]: kept keys before j
    lead = kept.shape[:-1]
    last = counts.gather(-1, (hi + 1).expand(*lead, -1))
    in_window = last - counts.gather(-1, lo.expand(*lead, -1))
    return in_window == kept


def local_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int = 0,
    mask: Tensor | None = None,
    shared_qk: bool = False,
    exact_windowsize: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    rotary: Rotary | None = None,
    compiled: bool = True,
) -> Tensor:
    """Same contract as :func:`~longrange.ops.local.naive.local_attention_naive`.

    q, k: [B, H, N, D], v: [B, H, N, E]; mask: [B, N] or [B, H, N]; bias broadcastable to
    [B, H, C, K]. Returns [B, H, N, E].
    """
    batch, heads, n, _ = q.shape
    device = q.device
    if shared_qk:
        k = F.normalize(k, dim=-1)
    pos = torch.arange(n, device=device)
    if rotary is not None:
        q, k = rotary(q, k, pos + look_forward * window_size, pos)
    lo, hi = window_bounds(
        pos,
        window_size=window_size,
        look_backward=look_backward,
        look_forward=look_forward,
        causal=causal,
        exact_windowsize=exact_windowsize,
        seq_len=n,
    )

    keys_kept = None
    if mask is not None:
        keys_kept = mask[:, None, :] if mask.dim() == 2 else mask
        keys_kept = keys_kept.expand(batch, heads, n).contiguous()
    alone = None
    if shared_qk:
        kept = keys_kept if keys_kept is not None else q.new_ones(1, 1, n, dtype=torch.bool)
        alone = alone_queries(kept, lo, hi).expand(batch, heads, n).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (kv_idx >= lo[q_idx]) & (kv_idx <= hi[q_idx])
        if keys_kept is not None:
            keep = keep & keys_kept[b, h, kv_idx]
        if alone is not None:
            keep = keep & ((kv_idx != q_idx) | alone[b, h, q_idx])
        return keep

    score_mod = None
    if bias is not None:
        span = bias.shape[-1]
        full_bias = bias.expand(batch, heads, window_size, span)

        def score_mod(score, b, h, q_idx, kv_idx):
            col = span_columns(q_idx, kv_idx, window_size=window_size, look_backward=look_backward)
            return score + full_bias[b, h, q_idx % window_size, col.clamp(0, span - 1)]

    per_row = keys_kept is not None or alone is not None
    block_mask = create_block_mask(
        mask_mod,
        B=batch if per_row else None,
        H=heads if per_row else None,
        Q_LEN=n,
        KV_LEN=n,
        device=device,
        _compile=compiled,
    )
    attend = compiled_flex_attention() if compiled else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
