"""Local attention: each query attends to the keys of its window and of neighbouring windows.

The semantics are those of the ``local-attention`` package that the Routing, Sinkhorn and
Memorizing references build on (windows of ``window_size`` positions, ``look_backward`` and
``look_forward`` neighbour windows, ``causal``, ``exact_windowsize``, ``shared_qk``, a key
padding mask with True = keep), with two differences that make it exact at any length:
- any N is accepted; padding up to a multiple of the window is masked out, so the result for a
  sequence never depends on how much padding it needed;
- a query that has no key left (all masked) gets zeros, never NaN and never a uniform average.

Backends (one choice point, :func:`resolve_backend`):
- ``naive``: dense attention with the band mask, the reference;
- ``blocked``: one SDPA call over windows and their gathered spans, O(N * K) memory;
- ``flex``: compiled FlexAttention with a block mask (no gather), for CUDA.

Dimensions: B batch, H heads, N positions, C window size, S windows in a span
(look_backward + 1 + look_forward), K = S * C keys per span, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.checks import floating_tensors, kind, one_dtype
from longrange.ops.local.blocked import local_attention_blocked
from longrange.ops.local.decode import local_attention_step, local_cache_length
from longrange.ops.local.naive import Rotary, local_attention_naive, window_bounds

BACKENDS = ("auto", "blocked", "naive", "flex")

__all__ = [
    "BACKENDS",
    "local_attention",
    "local_attention_blocked",
    "local_attention_naive",
    "local_attention_step",
    "local_cache_length",
    "resolve_backend",
    "window_bounds",
]


def resolve_backend(
    backend: str, q: Tensor, *, dropout: float, rotary: Rotary | None, bias: Tensor | None
) -> str:
    """The backend that runs: ``auto`` takes compiled FlexAttention on CUDA (unless dropout,
    rotary positions or a bias ask for the blocked path) and the blocked SDPA path elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if q.is_cuda and dropout == 0 and rotary is None and bias is None:
        return "flex"
    return "blocked"


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    floating_tensors(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q, k must be [B, H, N, D] and v [B, H, N, E] alike, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    one_dtype(q=q, k=k, v=v, autocast_casts=False)
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = keep), got {kind(mask)}")
    batch, heads, n, _ = q.shape
    if tuple(mask.shape) not in ((batch, n), (batch, 1, n), (batch, heads, n)):
        raise ValueError(f"mask must be [B, N] or [B, H, N] = {(batch, heads, n)}, got {tuple(mask.shape)}")


def _check_bias(bias: Tensor | None, q: Tensor, window_size: int, span: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {kind(bias)}")
    try:
        torch.broadcast_shapes(bias.shape, (*q.shape[:2], window_size, span))
    except RuntimeError:
        ok = False
    else:
        ok = bias.dim() <= 4 and tuple(bias.shape[-2:]) == (window_size, span)
    if not ok:
        raise ValueError(
            f"bias must broadcast to [B, H, C, K] = {(*q.shape[:2], window_size, span)} "
            f"(window rows by span columns), got {tuple(bias.shape)}"
        )


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    causal: bool = False,
    look_backward: int = 1,
    look_forward: int | None = None,
    mask: Tensor | None = None,
    shared_qk: bool = False,
    exact_windowsize: bool = False,
    dropout: float = 0.0,
    scale: float | None = None,
    bias: Tensor | None = None,
    rotary: Rotary | None = None,
    backend: str = "auto",
) -> Tensor:
    """Local attention of every query over its window and ``look_backward`` / ``look_forward``
    neighbour windows.

    q, k: [B, H, N, D], v: [B, H, N, E], any N. ``look_forward`` defaults to 0 when causal and
    to ``look_backward`` otherwise. mask: [B, N] or [B, H, N], True = key may be attended.
    shared_qk: keys are L2-normalised and a query skips its own key unless it has no other.
    bias: additive scores broadcastable to [B, H, C, K], indexed by (query row in its window,
    key column in the span). rotary(q, k, q_positions, k_positions) -> (q, k) applies relative
    positions (only position differences may matter to it). scale defaults to D ** -0.5.
    Returns [B, H, N, E].
    """
    _check_count("window_size", window_size, 1)
    _check_count("look_backward", look_backward, 0)
    if look_forward is None:
        look_forward = 0 if causal else look_backward
    _check_count("look_forward", look_forward, 0)
    if causal and look_forward:
        raise ValueError(f"look_forward must be 0 when causal, got {look_forward}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    _check_inputs(q, k, v, mask)
    span = (look_backward + 1 + look_forward) * window_size
    _check_bias(bias, q, window_size, span)
    chosen = resolve_backend(backend, q, dropout=dropout, rotary=rotary, bias=bias)
    if dropout and chosen != "blocked":
        raise ValueError(f"dropout needs backend 'blocked' or 'auto', got {backend!r}")
    options = dict(
        window_size=window_size,
        causal=causal,
        look_backward=look_backward,
        look_forward=look_forward,
        mask=mask,
        shared_qk=shared_qk,
        exact_windowsize=exact_windowsize,
        scale=scale,
        bias=bias,
        rotary=rotary,
    )
    if chosen == "naive":
        return local_attention_naive(q, k, v, **options)
    if chosen == "flex":
        from longrange.ops.local.flex import local_attention_flex

        return local_attention_flex(q, k, v, **options)
    return local_attention_blocked(q, k, v, dropout=dropout, **options)
