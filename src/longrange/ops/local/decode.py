"""One decoding step of causal local attention: a new query against the cached recent keys.

The query at absolute position p sees, in a full causal pass, the keys of its own window and of
the look_backward windows before it, up to itself: at most (look_backward + 1) * C keys, all
among the last :func:`local_cache_length` positions. The step reads the cached keys from the
window's first one on and masks them with the same rules as the full pass
(:func:`longrange.ops.local.naive.window_bounds`) where a mask is needed (padding, shared
query-key), so it returns exactly the row p of the full result.

Rotary positions inside a span depend on the query's window, so the cache holds keys *before*
rotation and the step rotates them with the same span columns as the blocked path.

Dimensions: B batch, H heads, M cached positions, C window size, K keys per span, D head width,
E value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.dense.sdpa import dense_attention_sdpa
from longrange.ops.local.naive import Rotary, exclude_self, window_keep


def local_cache_length(*, window_size: int, look_backward: int) -> int:
    """The most recent positions a causal query can see: enough for any decoding step."""
    return (look_backward + 1) * window_size


def local_attention_step(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    position: int,
    window_size: int,
    look_backward: int = 1,
    mask: Tensor | None = None,
    shared_qk: bool = False,
    exact_windowsize: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
    rotary: Rotary | None = None,
) -> Tensor:
    """Causal local attention of the single query at absolute ``position``.

    q: [B, H, 1, D]; k_cache: [B, H, M, D] (unrotated), v_cache: [B, H, M, E], holding positions
    position - M + 1 .. position (the newest is the query's own token); mask: [B, M] or
    [B, H, M] (True = keep); bias broadcastable to [B, H, C, K]. Returns [B, H, 1, E], equal to
    row ``position`` of ``local_attention(..., causal=True, look_forward=0)`` over the sequence.
    """
    if not isinstance(position, int) or position < 0:
        raise ValueError(f"position must be a non-negative int, got {position!r}")
    if q.dim() != 4 or q.shape[-2] != 1:
        raise ValueError(f"q must be [B, H, 1, D] (one new query), got {tuple(q.shape)}")
    m = k_cache.shape[-2]
    if k_cache.shape[:-1] != v_cache.shape[:-1] or not 1 <= m <= position + 1:
        raise ValueError(
            f"k_cache and v_cache must be [B, H, M, *] with 1 <= M <= position + 1 = "
            f"{position + 1}, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    device = q.device
    span_start = (position // window_size - look_backward) * window_size
    # the window's first key (window_bounds for one causal query): the cached keys before it
    # are cut off rather than masked, so that a step without padding needs no mask at all
    lo = max(span_start, 0, position - look_backward * window_size if exact_windowsize else 0)
    first = max(lo - (position - m + 1), 0)
    if first:
        k_cache, v_cache = k_cache[..., first:, :], v_cache[..., first:, :]
        mask = None if mask is None else mask[..., first:]
    k_pos = torch.arange(position - m + 1 + first, position + 1, device=device)
    q_pos = torch.full((1,), position, device=device)
    k = F.normalize(k_cache, dim=-1) if shared_qk else k_cache
    if rotary is not None:
        q, k = rotary(q, k, q_pos - span_start, k_pos - span_start)
    keep = None
    if mask is not None or shared_qk:
        keep = window_keep(
            q_pos[:, None],
            k_pos[None, :],
            window_size=window_size,
            look_backward=look_backward,
            look_forward=0,
            causal=True,
            exact_windowsize=exact_windowsize,
            seq_len=position + 1,
        )  # [1, M]
    if mask is not None:
        keys_kept = mask[:, None, :] if mask.dim() == 2 else mask
        keep = keep & keys_kept[..., None, :]
    if shared_qk:
        keep = exclude_self(keep, (k_pos == position)[None, :])
    step_bias = None
    if bias is not None:
        cols = (k_pos - span_start).clamp(0, bias.shape[-1] - 1)
        row = position % window_size
        step_bias = bias[..., row : row + 1, cols]
    return dense_attention_sdpa(q, k, v_cache, mask=keep, bias=step_bias, scale=scale)
