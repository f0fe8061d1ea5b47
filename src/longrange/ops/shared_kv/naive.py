"""Reference attention of H query heads against one shared key/value head with an additive
bias [H, N, M] and optional extra logits per query (retrieved memories) in the same softmax:
the full score matrix, a softmax, two products.

Dimensions: B batch, H heads, N queries, M keys, D head width, K extra logits per query.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.dense.bias import ToeplitzBias


def shared_kv_attention_naive(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: ToeplitzBias | Tensor,
    *,
    scale: float = 1.0,
    memory_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """q [B, H, N, D], keys / values [B, M, D], bias [H or 1, N, M] (or a
    :class:`ToeplitzBias`), memory_logits [B, H, N, K] | None -> out [B, N, H, D] and the
    memory logits' weights [B, N, H, K] (None without them). Scores are
    ``scale * q . key + bias``."""
    dense = bias.dense() if isinstance(bias, ToeplitzBias) else bias
    scores = torch.einsum("bhnd,bmd->bhnm", q * scale, keys) + dense.to(q.dtype)
    k = 0
    if memory_logits is not None:
        k = memory_logits.shape[-1]
        scores = torch.cat([memory_logits.to(scores.dtype), scores], dim=-1)
    weights = scores.softmax(dim=-1)
    out = torch.einsum("bhnm,bmd->bnhd", weights[..., k:], values)
    if memory_logits is None:
        return out, None
    return out, weights[..., :k].transpose(1, 2)
