"""Boolean attention masks shared by the exact-attention paths.

Dimensions: N queries, M keys; True = may attend.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(n: int, m: int, device: torch.device | None = None) -> Tensor:
    """[N, M] boolean mask: query i (at absolute position m - n + i) sees keys j <= m - n + i."""
    offset = m - n
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    return cols <= rows + offset


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as an additive one: 0 where True, -inf where False (what the fused
    kernels add to the scores)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def merge_masks(mask: Tensor | None, causal: bool, n: int, m: int, device: torch.device) -> Tensor | None:
    """Combine a padding/attention mask with the causal band; None when nothing is masked."""
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
    if not causal:
        return mask
    band = causal_mask(n, m, device)
    return band if mask is None else mask & band
