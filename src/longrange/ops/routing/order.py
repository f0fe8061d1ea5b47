"""The (cluster, position) order that causal routing works in (docs/ARCHITECTURE.md; the
construction is described in :mod:`longrange.ops.routing.causal`).

Dimensions: B batch, H heads, N positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

PAD_CLUSTER = -1  # padded tokens
NO_CLUSTER = -2  # slots past the end of the sorted sequence (and in front of it)


def default_block_size(window_size: int) -> int:
    """Queries per block: half the window (spans of 1.5 W keys rather than 2 W) down to 16."""
    return max(min(16, window_size), window_size // 2)


def sort_by_cluster(clusters: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (cluster, position) order of clusters [B, H, N]: returns (order [B, H, N], the
    cluster of each sorted token [B, H, N]); padded tokens get :data:`PAD_CLUSTER`."""
    n = clusters.shape[-1]
    if mask is not None:
        clusters = clusters.masked_fill(~mask[:, None, :], PAD_CLUSTER)
    pos = torch.arange(n, device=clusters.device)
    key = (clusters.long() + 1) * n + pos
    order = key.argsort(dim=-1)
    return order, clusters.gather(-1, order)
