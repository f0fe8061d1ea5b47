"""Reference attention of H query heads against one shared key/value head with an additive
bias [H, N, M] and optional extra logits per query (retrieved memories) in the same softmax:
the full score matrix, a softmax, two products. The products are one GEMM over every head
each (:func:`shared_kv_scores`, :func:`shared_kv_output`, also what the Memorizing layers'
own score-matrix path uses, the tests' reference; tests hold them to einsum).

Dimensions: B batch, H heads, N queries, M keys, D head width, K extra logits per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.dense.bias import ToeplitzBias


def shared_kv_scores(q: Tensor, keys: Tensor, bias: Tensor) -> Tensor:
    """Queries q [B, H, N, D] (scaled) against one key head keys [B, M, D], plus the additive
    bias [H or 1, N, M] -> [B, H, N, M]: one GEMM over every head, adding the bias as it
    writes (no separate pass over the scores)."""
    b, h, n, d = q.shape
    m = keys.shape[1]
    bias = bias.to(q.dtype).expand(h, n, m).reshape(1, h * n, m)
    return torch.baddbmm(bias, q.reshape(b, h * n, d), keys.transpose(1, 2)).view(b, h, n, m)


def shared_kv_output(attn: Tensor, values: Tensor) -> Tensor:
    """Weights attn [B, H, N, M] (rows may be strided) times one value head [B, M, D] ->
    [B, H, N, D]: one GEMM over every head."""
    b, h, n, m = attn.shape
    return torch.bmm(attn.reshape(b, h * n, m).to(values.dtype), values).view(b, h, n, values.shape[-1])


def shared_kv_attention_naive(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    bias: ToeplitzBias | Tensor,
    *,
    scale: float = 1.0,
    memory_logits: Tensor | None = None,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """q [B, H, N, D], keys / values [B, M, D], bias [H or 1, N, M] (or a
    :class:`ToeplitzBias`), memory_logits [B, H, N, K] | None, key_mask [B, M] bool | None
    (True: a real key; a hidden key's score is the most negative finite number), dropout (the
    attention dropout rate, on the weights after the softmax) -> out [B, N, H, D] and the
    memory logits' weights [B, N, H, K] (after dropout; None without them). Scores are
    ``scale * q . key + bias``."""
    dense = bias.dense() if isinstance(bias, ToeplitzBias) else bias
    scores = shared_kv_scores(q * scale, keys, dense)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -torch.finfo(scores.dtype).max)
    k = 0
    if memory_logits is not None:
        k = memory_logits.shape[-1]
        scores = torch.cat([memory_logits.to(scores.dtype), scores], dim=-1)
    weights = scores.softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    out = shared_kv_output(weights[..., k:], values).transpose(1, 2)
    if memory_logits is None:
        return out, None
    return out, weights[..., :k].transpose(1, 2)
