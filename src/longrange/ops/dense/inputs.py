"""The argument checks of :func:`~longrange.ops.dense.dense_attention`: shapes, dtypes and
numbers only (no tensor is read), so that a wrong argument is named before any work.

Dimensions: B batch, H heads, N queries, M keys, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kind(x: object) -> str:
    return str(x.dtype) if isinstance(x, Tensor) else type(x).__name__


def _broadcasts(shape: torch.Size, target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def check_dense_inputs(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, dropout: float
) -> None:
    """Refuse what :func:`~longrange.ops.dense.dense_attention` cannot compute, naming it."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_kind(t)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N or M, D or E], got shape {tuple(t.shape)}")
    # under autocast the kernels cast their inputs themselves (a bfloat16 query against a
    # float32 KV cache, say, while decoding)
    if not q.dtype == k.dtype == v.dtype and not torch.is_autocast_enabled(q.device.type):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, d = q.shape
    m = k.shape[2]
    if tuple(k.shape) != (b, h, m, d) or tuple(v.shape[:3]) != (b, h, m):
        raise ValueError(
            f"q [B, H, N, D], k [B, H, M, D] and v [B, H, M, E] must agree, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    full = (b, h, n, m)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got {_kind(mask)}")
        if not _broadcasts(mask.shape, full):
            raise ValueError(f"mask must broadcast to [B, H, N, M] = {full}, got {tuple(mask.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {_kind(bias)}")
        if not _broadcasts(bias.shape, full):
            raise ValueError(f"bias must broadcast to [B, H, N, M] = {full}, got {tuple(bias.shape)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
