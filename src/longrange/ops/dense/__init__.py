"""Exact softmax attention with boolean masks, causal offsets and additive biases.

:func:`dense_attention` is the one place that picks the backend: the fused SDPA kernel
(``sdpa.py``) or the explicit score matrix (``naive.py``, the reference).
"""

from __future__ import annotations

from torch import Tensor

from longrange.ops.dense.inputs import check_dense_inputs
from longrange.ops.dense.masks import additive_mask, causal_mask, merge_masks
from longrange.ops.dense.naive import dense_attention_naive
from longrange.ops.dense.sdpa import cpu_flash_supported, dense_attention_sdpa


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
    """Exact attention; ``backend`` is "sdpa" (fused, the default) or "naive" (reference).

    q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E] of one floating dtype; mask (bool, True =
    may attend) and bias broadcastable to [B, H, N, M]; dropout in [0, 1). Returns [B, H, N, E].
    """
    check_dense_inputs(q, k, v, mask, bias, dropout)
    if backend == "sdpa":
        return dense_attention_sdpa(
            q, k, v, mask=mask, causal=causal, bias=bias, scale=scale, dropout=dropout
        )
    if backend == "naive":
        if dropout:
            raise ValueError("dropout is only supported by backend='sdpa'")
        return dense_attention_naive(q, k, v, mask=mask, causal=causal, bias=bias, scale=scale)
    raise ValueError(f"backend must be 'sdpa' or 'naive', got {backend!r}")


__all__ = [
    "additive_mask",
    "causal_mask",
    "cpu_flash_supported",
    "dense_attention",
    "dense_attention_naive",
    "dense_attention_sdpa",
    "merge_masks",
]
