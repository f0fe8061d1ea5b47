"""The argument checks of :func:`~longrange.ops.dense.dense_attention`: shapes, dtypes and
numbers only (no tensor is read), so that a wrong argument is named before any work.

Dimensions: B batch, H heads, N queries, M keys, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.checks import floating_tensors, kind, one_dtype


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
    floating_tensors(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N or M, D or E], got shape {tuple(t.shape)}")
    one_dtype(q=q, k=k, v=v, autocast_casts=True)
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
            raise TypeError(f"mask must be a bool tensor (True = attend), got {kind(mask)}")
        if not _broadcasts(mask.shape, full):
            raise ValueError(f"mask must broadcast to [B, H, N, M] = {full}, got {tuple(mask.shape)}")
    if bias is not None:
        floating_tensors(bias=bias)
        if not _broadcasts(bias.shape, full):
            raise ValueError(f"bias must broadcast to [B, H, N, M] = {full}, got {tuple(bias.shape)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
