"""Product key memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

A layer with ``num_keys ** 2`` learned value vectors that each token reads sparsely:

1. every head makes a query and splits it into two halves;
2. each half scores its own ``num_keys`` sub-keys and keeps its ``topk`` best;
3. the ``topk ** 2`` pairs (one sub-key from each half) are candidate memories, scored by the
   sum of their two sub-key scores; the best ``topk`` are kept and softmax-weighted;
4. the weighted values are summed over memories and heads (an ``EmbeddingBag`` lookup, so
   only the selected rows are touched and receive gradients).

So finding the best of N = num_keys ** 2 memories costs O(sqrt(N)) per query.

Query normalisation: ``query_norm="batch"`` is the paper's batch norm over the (real) tokens
of the batch, as the product-key-memory package used by the routing reference did; in
training its statistics come from the whole batch, so a token's output depends on later
tokens, which breaks causal models. ``query_norm="layer"`` (the default, and the package's
later default) normalises each query on its own. With batch norm inside a reversible stack,
running statistics are updated once, not again during recomputation.

The values usually want a larger learning rate than the rest of the model; collect them with
:func:`pkm_value_parameters`.
Dimensions: B batch, N sequence, D model width, H heads, E dim_head, K num_keys, T topk.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from longrange.modules.reversible import in_recomputation

QUERY_NORMS = ("layer", "batch")


class PKM(nn.Module):
    """Product key memory layer: x [B, N, D] -> [B, N, D].

    Args:
        dim: model width D (the width of each value).
        heads: number of query heads H; their reads are summed.
        num_keys: sub-keys per half K; there are K ** 2 memories.
        topk: T, the sub-keys kept per half and the memories read per head.
        dim_head: width E of each half-query and sub-key.
        input_dropout, query_dropout, value_dropout: dropout on x, on the queries, on the
            output.
        query_norm: ``"layer"`` or ``"batch"`` (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        num_keys: int = 128,
        topk: int = 32,
        dim_head: int = 256,
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        *,
        query_norm: str = "layer",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("num_keys", num_keys)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if dim_head <= 0:
            raise ValueError(f"dim_head must be positive, got {dim_head}")
        if not 1 <= topk <= num_keys:
            raise ValueError(f"topk must be in [1, num_keys={num_keys}], got {topk}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        self.heads, self.num_keys, self.topk, self.dim_head = heads, num_keys, topk, dim_head
        self.query_norm = query_norm
        self.to_queries = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        if query_norm == "layer":
            self.norm = nn.LayerNorm(dim_head)
        else:
            self.norm = nn.BatchNorm1d(dim_head)
        self.keys = nn.Parameter(torch.randn(heads, num_keys, 2, dim_head) / math.sqrt(dim_head))
        self.values = nn.EmbeddingBag(num_keys**2, dim, mode="sum")
        nn.init.normal_(self.values.weight, std=1 / math.sqrt(dim))
        self.input_dropout = nn.Dropout(input_dropout)
        self.query_dropout = nn.Dropout(query_dropout)
        self.value_dropout = nn.Dropout(value_dropout)

    def _batch_norm(self, q: Tensor, mask: Tensor | None) -> Tensor:
        """q [B, N, 2, H, E]; statistics over the real tokens when training."""
        bn: nn.BatchNorm1d = self.norm
        if not self.training:
            return F.batch_norm(
                q.reshape(-1, self.dim_head),
                bn.running_mean,
                bn.running_var,
                bn.weight,
                bn.bias,
                False,
                0.0,
                bn.eps,
            ).view_as(q)
        update = not in_recomputation()
        rows = q if mask is None else q[mask]  # [R, 2, H, E]
        flat = rows.reshape(-1, self.dim_head)
        if flat.shape[0] < 2:
            raise ValueError("query_norm='batch' needs at least one unpadded token in training")
        if update:
            bn.num_batches_tracked += 1
        normed = F.batch_norm(
            flat,
            bn.running_mean if update else None,
            bn.running_var if update else None,
            bn.weight,
            bn.bias,
            True,
            bn.momentum,
            bn.eps,
        ).view_as(rows)
        if mask is None:
            return normed
        # padded tokens are normalised with the same statistics; they never enter them
        mean = flat.mean(dim=0).detach()
        var = flat.var(dim=0, unbiased=False).detach()
        out = (q - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias
        return out.masked_scatter(mask[..., None, None, None], normed)

    def forward(self, x: Tensor, input_mask: Tensor | None = None, **kwargs) -> Tensor:
        """x [B, N, D]; ``input_mask`` [B, N] bool (True = real) only shapes batch statistics."""
        dim = self.values.embedding_dim
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"x must be [B, N, D={dim}], got shape {tuple(x.shape)}")
        reads_mask = self.query_norm == "batch" and self.training and input_mask is not None
        if reads_mask and (input_mask.dtype != torch.bool or input_mask.shape != x.shape[:2]):
            raise ValueError(
                f"input_mask must be a bool tensor [B, N] = {tuple(x.shape[:2])}, got "
                f"{input_mask.dtype} {tuple(input_mask.shape)}"
            )
        b, n = x.shape[:2]
        h, t = self.heads, self.topk
        q = self.to_queries(self.input_dropout(x)).view(b, n, 2, h, self.dim_head)
        q = self.norm(q) if self.query_norm == "layer" else self._batch_norm(q, input_mask)
        q = self.query_dropout(q)
        scores = torch.einsum("bnphe,hkpe->bnhpk", q, self.keys.to(q.dtype))
        half_scores, half_ids = scores.topk(t, dim=-1)  # [B, N, H, 2, T]
        pair_scores = half_scores[..., 0, :, None] + half_scores[..., 1, None, :]
        pair_ids = half_ids[..., 0, :, None] * self.num_keys + half_ids[..., 1, None, :]
        best, where = pair_scores.flatten(-2).topk(t, dim=-1)  # [B, N, H, T]
        memory_ids = pair_ids.flatten(-2).gather(-1, where)
        weights = best.softmax(dim=-1).to(self.values.weight.dtype)
        out = self.values(memory_ids.reshape(b * n, h * t), per_sample_weights=weights.reshape(b * n, h * t))
        return self.value_dropout(out.view(b, n, dim))


def pkm_value_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The value tables of every :class:`PKM` inside ``module`` (itself included).

    Put them in their own optimizer group, e.g. with a 10x learning rate and no weight decay.
    """
    return [m.values.weight for m in module.modules() if isinstance(m, PKM)]
