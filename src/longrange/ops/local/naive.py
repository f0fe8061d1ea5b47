"""Reference local attention: dense attention over all N keys with a band mask.

It also defines, for every backend, which keys a query sees (:func:`window_bounds`): the
sequence is cut into windows of C positions; a query in window b sees the keys of windows
b - look_backward .. b + look_forward, then
- causal: only keys at or before the query;
- exact_windowsize: only keys at most C * look_backward before it (and, non-causal, at most
  C * look_forward after it);
- a key padding mask removes keys (True = keep);
- shared_qk: keys are L2-normalised and a query does not see its own key unless it sees no
  other key.
Every rule is an interval of key positions except the padding mask and the shared_qk rule.

Dimensions: B batch, H heads, N positions, C window size, S windows in a span
(look_backward + 1 + look_forward), K = S * C keys per span, D head width, E value width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.dense.naive import dense_attention_naive

Rotary = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def window_bounds(
    q_pos: Tensor,
    *,
    window_size: int,
    look_backward: int,
    look_forward: int,
    causal: bool,
    exact_windowsize: bool,
    seq_len: int,
) -> tuple[Tensor, Tensor]:
    """First and last (inclusive) key position each query position in ``q_pos`` may see."""
    block_start = torch.div(q_pos, window_size, rounding_mode="floor") * window_size
    lo = (block_start - look_backward * window_size).clamp_min(0)
    hi = (block_start + (look_forward + 1) * window_size - 1).clamp_max(seq_len - 1)
    if causal:
        hi = torch.minimum(hi, q_pos)
    if exact_windowsize:
        lo = torch.maximum(lo, q_pos - look_backward * window_size)
        if not causal:
            hi = torch.minimum(hi, q_pos + look_forward * window_size)
    return lo, hi


def window_keep(q_pos: Tensor, k_pos: Tensor, **geometry) -> Tensor:
    """Boolean keep mask, broadcast of ``q_pos`` against ``k_pos``; see :func:`window_bounds`."""
    lo, hi = window_bounds(q_pos, **geometry)
    return (k_pos >= lo) & (k_pos <= hi)


def exclude_self(keep: Tensor, is_self: Tensor) -> Tensor:
    """Drop each query's own key, except for queries that would be left with no key at all."""
    others = keep & ~is_self
    alone = ~others.any(dim=-1, keepdim=True)
    return others | (keep & is_self & alone)


def span_columns(q_pos: Tensor, k_pos: Tensor, *, window_size: int, look_backward: int) -> Tensor:
    """Column of key ``k_pos`` in the span of keys that query ``q_pos``'s window sees."""
    span_start = (torch.div(q_pos, window_size, rounding_mode="floor") - look_backward) * window_size
    return k_pos - span_start


def local_attention_naive(
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
) -> Tensor:
    """Local attention from the full [N, N] score matrix (a reference: O(N^2) memory).

    q, k: [B, H, N, D], v: [B, H, N, E]; mask: [B, N] or [B, H, N] (True = keep); bias:
    broadcastable to [B, H, C, K], indexed by (query row in its window, key column in the span);
    rotary(q, k, q_positions, k_positions) rotates by positions whose differences are those of
    the blocked path (queries sit look_forward windows to the right). Returns [B, H, N, E].
    """
    n, device = q.shape[-2], q.device
    if shared_qk:
        k = F.normalize(k, dim=-1)
    pos = torch.arange(n, device=device)
    if rotary is not None:
        q, k = rotary(q, k, pos + look_forward * window_size, pos)
    keep = window_keep(
        pos[:, None],
        pos[None, :],
        window_size=window_size,
        look_backward=look_backward,
        look_forward=look_forward,
        causal=causal,
        exact_windowsize=exact_windowsize,
        seq_len=n,
    )
    if mask is not None:
        keys_kept = mask[:, None, :] if mask.dim() == 2 else mask
        keep = keep & keys_kept[..., None, :]
    if shared_qk:
        keep = exclude_self(keep, pos[:, None] == pos[None, :])
    dense_bias = None
    if bias is not None:
        span = bias.shape[-1]
        rows = (pos % window_size)[:, None]
        cols = span_columns(pos[:, None], pos[None, :], window_size=window_size, look_backward=look_backward)
        dense_bias = bias[..., rows, cols.clamp(0, span - 1)]
    return dense_attention_naive(q, k, v, mask=keep, bias=dense_bias, scale=scale)
