"""Sinkhorn sort nets: the layers that score key buckets for query buckets.

Named as in the sinkhorn-transformer reference; the maths lives in
:mod:`longrange.ops.sinkhorn`. Non-causal nets return a :class:`BucketChoice`; causal nets
return top-k picks (indices, weights) [B, H, U, P] over P null columns and the earlier key
buckets, and score one new bucket at a time for decoding (:meth:`step_scores`).

Where this differs from the reference, on purpose:
- the Gumbel noise of the Sinkhorn sort is drawn only in training;
- padding never enters a bucket summary, and a key bucket without a real key is not picked;
- causal nets never shrink the number of null buckets on short sequences (the reference
  does, which makes early positions depend on the sequence length);
- ``causal_queries`` (used by context attention inside a causal decoder) summarises a query
  bucket by the running mean at its first position, so no query sees the future through the
  sort.
As in the reference, the attention sort net's top-k weights use temperature 1.

Dimensions: B batch, H heads, N positions, U query buckets of S, V key buckets of T,
P null buckets / picks, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.ops.sinkhorn import (
    attention_sort_scores,
    bucket_means,
    bucket_sums,
    causal_bucket_summaries,
    causal_candidates_valid,
    causal_query_summaries,
    causal_sort_scores,
    differentiable_topk,
    gumbel_sinkhorn,
    key_bucket_valid,
)
from longrange.ops.sinkhorn.sort import head_mask


@dataclass
class BucketChoice:
    """Sorted key buckets: hard picks (``indices``, ``weights`` [B, H, U', K]) or a soft
    matrix ``reorder`` [B, H, U', V]; U' is 1 for a whole-sequence (SortCut) query."""

    indices: Tensor | None = None
    weights: Tensor | None = None
    reorder: Tensor | None = None

    @property
    def rows(self) -> int:
        if self.reorder is not None:
            return self.reorder.shape[2]
        return self.indices.shape[2] * self.indices.shape[3]


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    m = head_mask(mask)
    return x if m is None else x * m[..., None].to(x.dtype)


class SimpleSortNet(nn.Module):
    """Scores from a learned linear map of the bucket sums of queries and keys (fixed length:
    one column per key bucket of a ``max_buckets``-bucket sequence)."""

    def __init__(
        self,
        heads: int,
        bucket_size: int,
        max_buckets: int,
        dim: int,
        non_permutative: bool,
        temperature: float,
        sinkhorn_iter: int,
    ) -> None:
        super().__init__()
        self.heads, self.bucket_size, self.max_buckets = heads, bucket_size, max_buckets
        self.non_permutative, self.temperature, self.sinkhorn_iter = (
            non_permutative,
            temperature,
            sinkhorn_iter,
        )
        self.linear = nn.Parameter(torch.randn(1, heads, dim, max_buckets))

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        topk: int = 1,
        *,
        q_mask: Tensor | None = None,
        kv_mask: Tensor | None = None,
    ) -> BucketChoice:
        v_count = k.shape[2] // self.bucket_size
        if v_count != self.max_buckets or q.shape[2] != k.shape[2]:
            raise ValueError(
                f"the simple sort net needs sequences of exactly {self.max_buckets * self.bucket_size} "
                f"positions (max_seq_len), got {q.shape[2]}"
            )
        x = torch.cat(
            [bucket_sums(q, self.bucket_size, q_mask)[0], bucket_sums(k, self.bucket_size, kv_mask)[0]],
            dim=-1,
        )
        scores = F.relu(torch.einsum("bhux,hxv->bhuv", x, self.linear[0].to(x.dtype)))
        if self.non_permutative:
            valid = key_bucket_valid(kv_mask, self.bucket_size)
            idx, w = differentiable_topk(scores, topk, temperature=self.temperature, valid=valid)
            return BucketChoice(idx, w)
        reorder = gumbel_sinkhorn(
            scores, n_iters=self.sinkhorn_iter, temperature=self.temperature, noise=self.training
        )
        return BucketChoice(reorder=reorder)


class AttentionSortNet(nn.Module):
    """Scores = mean query of a bucket (of the whole sequence for SortCut) . mean key of each
    key bucket * D ** -0.5; no parameters."""

    def __init__(
        self,
        heads: int,
        bucket_size: int,
        kv_bucket_size: int,
        dim: int,
        non_permutative: bool,
        temperature: float,
        sinkhorn_iter: int,
        n_sortcut: int = 0,
        *,
        causal_queries: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.bucket_size, self.kv_bucket_size, self.dim = heads, bucket_size, kv_bucket_size, dim
        self.non_permutative, self.temperature, self.sinkhorn_iter = (
            non_permutative,
            temperature,
            sinkhorn_iter,
        )
        self.n_sortcut = n_sortcut
        self.causal_queries = causal_queries

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        topk: int = 1,
        *,
        q_mask: Tensor | None = None,
        kv_mask: Tensor | None = None,
    ) -> BucketChoice:
        v_count = k.shape[2] // self.kv_bucket_size
        if self.causal_queries:
            sq = causal_query_summaries(q, self.bucket_size, q_mask)
            sk = bucket_means(k, self.kv_bucket_size, kv_mask)
            scores = torch.einsum("bhud,bhvd->bhuv", sq, sk) * self.dim**-0.5
            picks = min(self.n_sortcut or topk, v_count)
            valid = key_bucket_valid(kv_mask, self.kv_bucket_size)
            idx, w = differentiable_topk(scores, picks, temperature=self.temperature, valid=valid)
            return BucketChoice(idx, w)
        sortcut = self.n_sortcut > 0
        scores, valid = attention_sort_scores(
            q,
            k,
            bucket_size=self.bucket_size,
            kv_bucket_size=self.kv_bucket_size,
            q_mask=q_mask,
            kv_mask=kv_mask,
            whole_query=sortcut and self.non_permutative,
        )
        if self.non_permutative:
            picks = min(self.n_sortcut if sortcut else topk, v_count)
            idx, w = differentiable_topk(scores, picks, valid=valid)
            return BucketChoice(idx, w)
        reorder = gumbel_sinkhorn(
            F.relu(scores), n_iters=self.sinkhorn_iter, temperature=self.temperature, noise=self.training
        )
        return BucketChoice(reorder=reorder)

    def context_summaries(self, k: Tensor, kv_mask: Tensor | None) -> Tensor:
        """Mean key of each key bucket [B, H, V, D] (decoding with ``causal_queries``)."""
        return bucket_means(k, self.kv_bucket_size, kv_mask)


class CausalSimpleSortNet(nn.Module):
    """Causal scores from a learned linear map of [running mean of keys, key] at each bucket's
    first position; LeakyReLU; column c < P is a null bucket, P + j key bucket j."""

    def __init__(
        self, heads: int, bucket_size: int, max_buckets: int, n_top_buckets: int, dim: int, temperature: float
    ) -> None:
        super().__init__()
        self.heads, self.bucket_size, self.max_buckets = heads, bucket_size, max_buckets
        self.n_top_buckets, self.temperature = n_top_buckets, temperature
        self.linear = nn.Parameter(torch.randn(1, heads, dim, max_buckets + n_top_buckets))

    def _scores(self, x: Tensor, n_cols: int, heads: slice = slice(None)) -> Tensor:
        if n_cols > self.linear.shape[-1]:
            raise ValueError(
                f"sequence has more buckets than the simple sort net's max_seq_len allows "
                f"({self.max_buckets} buckets)"
            )
        w = self.linear[0, heads, :, :n_cols].to(x.dtype)
        return F.leaky_relu(torch.einsum("bh...x,hxc->bh...c", x, w))

    def forward(
        self, q: Tensor, k: Tensor, topk: int, *, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        s = self.bucket_size
        u = k.shape[2] // s
        ck_first = causal_bucket_summaries(k, s, mask, with_bucket_sums=False)[0]
        first = torch.cat([ck_first, _masked(k, mask)[:, :, ::s]], dim=-1)
        scores = self._scores(first, topk + u)
        valid = causal_candidates_valid(u, topk, device=k.device, has_real=key_bucket_valid(mask, s))
        return differentiable_topk(scores, topk, temperature=self.temperature, valid=valid)

    def step_scores(
        self, sq: Tensor, ck: Tensor, k_first: Tensor, sk_past: Tensor, topk: int, heads: slice = slice(None)
    ) -> Tensor:
        """Scores [B, Hg, P + u] of a bucket starting now (u = buckets before it), for the
        heads ``heads``: sq, ck, k_first [B, Hg, D], sk_past [B, Hg, u, D]."""
        return self._scores(torch.cat([ck, k_first], dim=-1), topk + sk_past.shape[2], heads)


class CausalAttentionSortNet(nn.Module):
    """Causal scores: running mean of queries at a bucket's first position . sum over a key
    bucket of the running mean of keys * D ** -0.5; null columns score 0; no parameters."""

    def __init__(self, heads: int, bucket_size: int, dim: int, temperature: float) -> None:
        super().__init__()
        self.heads, self.bucket_size, self.dim, self.temperature = heads, bucket_size, dim, temperature

    def forward(
        self, q: Tensor, k: Tensor, topk: int, *, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        scores, valid = causal_sort_scores(q, k, bucket_size=self.bucket_size, n_null=topk, mask=mask)
        return differentiable_topk(scores, topk, temperature=self.temperature, valid=valid)

    def step_scores(
        self, sq: Tensor, ck: Tensor, k_first: Tensor, sk_past: Tensor, topk: int, heads: slice = slice(None)
    ) -> Tensor:
        """Scores [B, Hg, P + u] of a bucket starting now; see :meth:`CausalSimpleSortNet.step_scores`."""
        real = torch.einsum("bhd,bhvd->bhv", sq, sk_past) * self.dim**-0.5
        return torch.cat([real.new_zeros(*real.shape[:2], topk), real], dim=-1)
