"""The argument checks of the shared-key/value attention entry points: shapes, dtypes and
numbers only (no tensor is read), so that a wrong argument is named before any work.

Dimensions: B batch, H query heads, N queries, M keys, D head width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longrange.checks import floating_tensors, kind, one_dtype


def check_shared_kv_inputs(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool, scale: float | None
) -> None:
    """Refuse what :func:`~longrange.ops.blockrec.shared_kv_attention` cannot compute, naming
    it: q [B, H, N, D], k / v [B, M, D] of one floating dtype (autocast casts mixed ones
    itself), key_mask [B, M] bool, causal a bool, scale None or a finite number."""
    floating_tensors(q=q, k=k, v=v)
    for name, t, dims in (("q", q, 4), ("k", k, 3), ("v", v, 3)):
        if t.dim() != dims:
            want = "[B, H, N, D]" if dims == 4 else "[B, M, D]"
            raise ValueError(f"{name} must be {dims}-D {want}, got shape {tuple(t.shape)}")
    one_dtype(q=q, k=k, v=v, autocast_casts=True)
    b, _, _, d = q.shape
    m = k.shape[1]
    if tuple(k.shape) != (b, m, d) or tuple(v.shape) != (b, m, d):
        raise ValueError(
            f"q [B, H, N, D], k [B, M, D] and v [B, M, D] must agree, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor (True = may attend), got {kind(key_mask)}")
        if tuple(key_mask.shape) != (b, m):
            raise ValueError(f"key_mask must be [B, M] = {(b, m)}, got {tuple(key_mask.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {kind(causal)}")
    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        # a compiled call may hold the scale as a symbol, which math.isfinite cannot read
        or (not torch.compiler.is_compiling() and not math.isfinite(scale))
    ):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
