"""Blocked local attention: one fused ``scaled_dot_product_attention`` call over all windows.

The sequence is cut into W windows of C positions (the last one padded). Each window's C queries
meet the keys of its span of S = look_backward + 1 + look_forward neighbouring windows
(K = S * C keys). SDPA sees the windows where it expects heads: queries are a free view
[B * H, W, C, D] of q, and keys and values one ``index_select`` each into [B * H, W, K, D].
Then the boolean mask, which carries the rules of
:func:`longrange.ops.local.naive.window_bounds`, is one [W, C, K] pattern broadcast over all
B * H rows (per-row only with a padding mask), and the output is a free view back to
[B, H, N, E]. Memory is O(N * K), never O(N^2).

Span positions that fall outside the sequence read a clamped (real) key; the mask removes them.
Rotary positions are applied inside the span (queries at columns K - C .. K - 1, keys at
0 .. K - 1), so position-dependent scales such as xPos stay bounded at any length.

Dimensions: B batch, H heads, N positions, W windows, C window size, S windows in a span,
K = S * C keys per span, D head width, E value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.local.naive import Rotary, exclude_self, window_keep


def span_positions(windows: int, *, window_size: int, look_backward: int, span: int, device):
    """[W, K] sequence position of each span column (negative or past the end at the edges)."""
    starts = (torch.arange(windows, device=device) - look_backward) * window_size
    return starts[:, None] + torch.arange(span, device=device)


def gather_spans(x: Tensor, positions: Tensor) -> Tensor:
    """x: [..., N, F], positions: [W, K] -> [..., W, K, F], out-of-range positions clamped."""
    index = positions.clamp(0, x.shape[-2] - 1).flatten()
    return x.index_select(-2, index).unflatten(-2, positions.shape)


def local_attention_blocked(
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
    dropout: float = 0.0,
) -> Tensor:
    """Same contract as :func:`~longrange.ops.local.naive.local_attention_naive`, plus dropout
    on the attention weights.

    q, k: [B, H, N, D], v: [B, H, N, E]; mask: [B, N] or [B, H, N]; bias broadcastable to
    [B, H, C, K]. Any N: the last window is padded and the output cut back. Returns
    [B, H, N, E].
    """
    batch, heads, n, _ = q.shape
    c, device = window_size, q.device
    windows = -(-n // c)
    extra = windows * c - n
    span = (look_backward + 1 + look_forward) * c
    if shared_qk:
        k = F.normalize(k, dim=-1)
    if extra:
        q = F.pad(q, (0, 0, 0, extra))

    k_pos = span_positions(windows, window_size=c, look_backward=look_backward, span=span, device=device)
    q_blocks = q.reshape(batch * heads, windows, c, q.shape[-1])
    k_spans = gather_spans(k, k_pos).flatten(0, 1)  # [B * H, W, K, D]
    v_spans = gather_spans(v, k_pos).flatten(0, 1)  # [B * H, W, K, E]
    cols = torch.arange(span, device=device)
    if rotary is not None:
        q_blocks, k_spans = rotary(q_blocks, k_spans, cols[span - c :], cols)

    q_pos = torch.arange(windows * c, device=device).view(windows, c, 1)
    keep = window_keep(
        q_pos,
        k_pos[:, None, :],
        window_size=c,
        look_backward=look_backward,
        look_forward=look_forward,
        causal=causal,
        exact_windowsize=exact_windowsize,
        seq_len=n,
    ).unsqueeze(0)  # [1, W, C, K]: the same for every batch row and head
    if mask is not None:
        keys_kept = mask[:, None, :] if mask.dim() == 2 else mask
        keys_kept = gather_spans(keys_kept[..., None], k_pos)[..., 0]  # [B, 1 | H, W, K]
        keep = (keep & keys_kept[..., None, :]).expand(batch, heads, -1, -1, -1).flatten(0, 1)
    if shared_qk:
        rows = torch.arange(c, device=device)[:, None]
        keep = exclude_self(keep, rows + look_backward * c == cols)

    empty_rows = None
    if mask is not None or extra:
        # Only a padding mask or the padded queries can leave a row with no key; SDPA would
        # return NaN there, so such rows are opened and their output zeroed afterwards (always
        # where no value can be read: under torch.compile and on the meta device).
        any_key = keep.any(dim=-1, keepdim=True)
        if torch.compiler.is_compiling() or device.type == "meta" or not bool(any_key.all()):
            empty_rows = ~any_key
            keep = keep | empty_rows
    attn_mask: Tensor = keep
    if bias is not None:
        bias = bias.to(q.dtype).expand(batch, heads, c, span).reshape(batch * heads, 1, c, span)
        attn_mask = bias.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(
        q_blocks, k_spans, v_spans, attn_mask=attn_mask, dropout_p=dropout, scale=scale
    )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    out = out.view(batch, heads, windows * c, out.shape[-1])
    return out[:, :, :n] if extra else out
