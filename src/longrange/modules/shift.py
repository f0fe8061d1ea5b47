"""Token shift: move slices of the features along the sequence before a branch sees them.

The feature width D is cut into ``len(shifts)`` equal slices of ``D // len(shifts)`` features
(any remainder is left alone); slice i is moved by ``shifts[i]`` positions, so a positive shift
s gives position t the features that position t - s had (zeros before the start). A shift of
0 keeps a slice in place. With only non-negative shifts the result at t depends on positions
<= t (causal).

Padding (``mask`` [B, N], True = keep) is honoured: padded positions are zeroed in the slices
that move, so they contribute zeros and never leak into real tokens. The references zeroed them
too, but their models never passed the mask, so padding was shifted into real tokens.

For decoding, ``past`` carries the last positions of the previous segment so that a sequence
processed piecewise gets the same result as in one go.
Dimensions: B batch, N sequence, D width, P past positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def _check_shifts(shifts: Sequence[int]) -> tuple[int, ...]:
    shifts = tuple(shifts)
    if not shifts:
        raise ValueError("shifts must name at least one offset, e.g. (0, 1)")
    for s in shifts:
        if not isinstance(s, int) or isinstance(s, bool):
            raise TypeError(f"shifts must be integers, got {shifts!r}")
    return shifts


def _move(t: Tensor, amount: int) -> Tensor:
    """t [B, N, F] moved by ``amount`` along N, zero-filled."""
    n = t.shape[1]
    if amount == 0:
        return t
    k = min(abs(amount), n)
    zeros = t.new_zeros(t.shape[0], k, t.shape[2])
    if amount > 0:
        return torch.cat((zeros, t[:, : n - k]), dim=1)
    return torch.cat((t[:, k:], zeros), dim=1)


def shift_tokens(
    x: Tensor,
    shifts: Sequence[int],
    mask: Tensor | None = None,
    *,
    past: Tensor | None = None,
    past_mask: Tensor | None = None,
) -> Tensor:
    """Shift feature slices of x [B, N, D] by ``shifts`` positions; see the module docstring.

    Args:
        mask: [B, N] bool, True for real tokens; padded positions contribute zeros.
        past: [B, P, D] the positions just before x (decoding); needs non-negative shifts.
        past_mask: [B, P] bool padding mask of ``past``.
    """
    shifts = _check_shifts(shifts)
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, seq, dim], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if len(shifts) > d:
        raise ValueError(f"len(shifts)={len(shifts)} exceeds the feature width {d}")
    if mask is not None and (mask.shape != (b, n) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {(b, n)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    p = 0
    if past is not None:
        if min(shifts) < 0:
            raise ValueError("past needs non-negative shifts (a negative shift reads the future)")
        if past.dim() != 3 or past.shape[0] != b or past.shape[2] != d:
            raise ValueError(f"past must be [{b}, P, {d}], got shape {tuple(past.shape)}")
        p = past.shape[1]
        if past_mask is not None and (past_mask.shape != (b, p) or past_mask.dtype != torch.bool):
            raise ValueError(
                f"past_mask must be a bool tensor of shape {(b, p)}, got {past_mask.dtype} "
                f"{tuple(past_mask.shape)}"
            )
        if mask is not None or past_mask is not None:
            past_keep = past_mask if past_mask is not None else past.new_ones(b, p, dtype=bool)
            keep = mask if mask is not None else x.new_ones(b, n, dtype=bool)
            mask = torch.cat((past_keep, keep), dim=1)
        x = torch.cat((past, x), dim=1)
    width = d // len(shifts)
    pieces = []
    for i, amount in enumerate(shifts):
        piece = x[..., i * width : (i + 1) * width]
        if amount != 0 and mask is not None:
            piece = piece.masked_fill(~mask[..., None], 0.0)
        pieces.append(_move(piece, amount))
    pieces.append(x[..., len(shifts) * width :])
    return torch.cat(pieces, dim=-1)[:, p:]


class PreShiftTokens(nn.Module):
    """``fn(shift_tokens(x, shifts, mask), **kwargs)`` with the mask read from the keywords.

    ``mask_key`` names the keyword that carries the padding mask (``"mask"`` by default; the
    routing model calls it ``"input_mask"``). The mask is still passed on to ``fn``.
    """

    def __init__(self, shifts: Sequence[int], fn: Callable, *, mask_key: str = "mask") -> None:
        super().__init__()
        self.shifts = _check_shifts(shifts)
        self.fn = fn
        self.mask_key = mask_key

    def forward(self, x: Tensor, **kwargs):
        shifted = shift_tokens(x, self.shifts, kwargs.get(self.mask_key))
        return self.fn(shifted, **kwargs)
