"""Sinkhorn attention over heads, non-causal: the reference's ``SinkhornAttention``, on
:mod:`longrange.ops.sinkhorn`, with the decoding state of context attention in a causal decoder.

Differences from the reference (sinkhorn-transformer 0.11.4), on purpose:
- the non-SortCut path reorders the *values* with the chosen buckets (the reference reorders
  the keys twice and uses them as values);
- with ``causal_queries`` (context attention inside a causal decoder) each query bucket picks
  its own context buckets (top-k, also when ``non_permutative=False``: a Sinkhorn column
  normalisation would mix later buckets in) from the running mean of the queries up to its
  first position, and there is no "own" context bucket (whether one exists would depend on
  the decoder length);
- Sinkhorn (``non_permutative=False``) with ``n_top_buckets`` K > 1 gives query bucket u the
  sorted rows u .. u + K - 1 (cyclic); the reference silently uses one. Sinkhorn with SortCut
  sorts the U buckets and keeps the first ``n_sortcut`` rows (the reference's one-row
  Sinkhorn degenerates to the plain sum of all buckets).

Dimensions: B batch, H heads, N positions, M context positions, U query buckets of S,
V key buckets of T, K picks, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrange.models.sinkhorn.sortnets import AttentionSortNet, BucketChoice, SimpleSortNet
from longrange.models.state import state_entry
from longrange.ops.dense import dense_attention
from longrange.ops.sinkhorn import (
    cumulative_mean,
    dense_selection,
    differentiable_topk,
    gather_buckets,
    key_bucket_valid,
    sinkhorn_attention,
    sinkhorn_attention_naive,
)

BACKENDS = ("auto", "naive")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@state_entry
@dataclass
class ContextCache:
    """Decoding state of one context-attention layer: the projected context and its bucket
    summaries, the running query sum, and the keys the current bucket picked."""

    k: Tensor  # [B, H, M, D]
    v: Tensor
    keep: Tensor | None  # [B, M]
    sk: Tensor  # [B, H, V, D]
    sum_q: Tensor  # [B, H, D]
    keys: Tensor | None = None  # [B, H, K * T, D]
    values: Tensor | None = None
    key_mask: Tensor | None = None  # [B, H, 1, K * T]


class SinkhornAttention(nn.Module):
    """Non-causal Sinkhorn heads: q [B, H, N, D], k, v [B, H, M, D] -> [B, H, N, D]."""

    def __init__(
        self,
        bucket_size: int,
        dim: int,
        dim_heads: int,
        heads: int,
        max_seq_len: int | None,
        temperature: float = 0.75,
        non_permutative: bool = True,
        sinkhorn_iter: int = 7,
        n_sortcut: int = 0,
        dropout: float = 0.0,
        kv_bucket_size: int | None = None,
        use_simple_sort_net: bool = False,
        n_top_buckets: int = 1,
        *,
        causal_queries: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend(backend)
        self.bucket_size = bucket_size
        self.kv_bucket_size = kv_bucket_size or bucket_size
        self.heads, self.temperature = heads, temperature
        self.non_permutative = non_permutative or causal_queries
        self.n_sortcut, self.n_top_buckets = n_sortcut, n_top_buckets
        self.causal_queries = causal_queries
        self.dropout = dropout
        self.backend = backend
        if use_simple_sort_net:
            if causal_queries:
                raise ValueError("use_simple_sort_net cannot sort context for a causal decoder")
            if max_seq_len is None:
                raise ValueError("use_simple_sort_net needs max_seq_len (its length is fixed)")
            if self.kv_bucket_size != bucket_size:
                raise ValueError("use_simple_sort_net needs kv_bucket_size == bucket_size")
            self.sort_net = SimpleSortNet(
                heads, self.kv_bucket_size, max_seq_len // self.kv_bucket_size, dim_heads * 2,
                non_permutative, temperature, sinkhorn_iter,
            )  # fmt: skip
        else:
            self.sort_net = AttentionSortNet(
                heads, bucket_size, self.kv_bucket_size, dim_heads, non_permutative, temperature,
                sinkhorn_iter, n_sortcut, causal_queries=causal_queries,
            )  # fmt: skip

    def _layout(self, choice: BucketChoice, u: int, v: int, n_top: int, device) -> tuple[Tensor, bool]:
        """Which sorted rows each query bucket sees ([U, K]) and whether its own bucket too."""
        rows = choice.rows
        ar = torch.arange
        if self.causal_queries:
            k = rows // u
            return ar(u, device=device)[:, None] * k + ar(k, device=device), False
        own = u == v
        if self.n_sortcut > 0:
            n = min(self.n_sortcut, rows)
            return ar(n, device=device).expand(u, n), own
        if choice.reorder is not None:
            k = min(n_top, rows)
            return (ar(u, device=device)[:, None] + ar(k, device=device)) % rows, own
        if rows % u:
            raise ValueError(f"the sort net gave {rows} sorted rows for {u} query buckets")
        k = rows // u
        return ar(u, device=device)[:, None] * k + ar(k, device=device), own

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_mask: Tensor | None = None, kv_mask=None) -> Tensor:
        u, v_count = q.shape[2] // self.bucket_size, k.shape[2] // self.kv_bucket_size
        n_top = min(self.n_top_buckets, v_count)
        choice = self.sort_net(q, k, topk=n_top, q_mask=q_mask, kv_mask=kv_mask)
        row_index, own = self._layout(choice, u, v_count, n_top, q.device)
        common = dict(
            bucket_size=self.bucket_size, kv_bucket_size=self.kv_bucket_size, row_index=row_index,
            include_own=own, kv_mask=kv_mask,
        )  # fmt: skip
        if self.backend == "naive":
            reorder = choice.reorder
            if reorder is None:
                reorder = dense_selection(
                    choice.indices.flatten(2)[..., None], choice.weights.flatten(2)[..., None], v_count
                )
            return sinkhorn_attention_naive(q, k, v, reorder=reorder, **common)
        dropout = self.dropout if self.training else 0.0
        if choice.reorder is not None:
            return sinkhorn_attention(q, k, v, reorder=choice.reorder, dropout=dropout, **common)
        return sinkhorn_attention(
            q,
            k,
            v,
            indices=choice.indices.flatten(2),
            weights=choice.weights.flatten(2),
            dropout=dropout,
            **common,
        )

    # --- decoding (context attention of a causal decoder) ----------------------------------
    def prefill_context(
        self, q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, length: int
    ) -> ContextCache:
        if not self.causal_queries:
            raise ValueError("incremental decoding needs context attention with causal_queries=True")
        sk = self.sort_net.context_summaries(k, kv_mask)
        cache = ContextCache(k, v, kv_mask, sk, q[:, :, :length].sum(dim=2))
        if length % self.bucket_size:
            start = length - length % self.bucket_size
            sq = cumulative_mean(q[:, :, : start + 1])[:, :, -1]
            self._select(cache, sq)
        return cache

    def _select(self, cache: ContextCache, sq: Tensor) -> None:
        t = self.kv_bucket_size
        b, h, m, d = cache.k.shape
        scores = torch.einsum("bhd,bhvd->bhv", sq, cache.sk) * d**-0.5
        valid = key_bucket_valid(cache.keep, t)
        picks = min(self.n_sortcut or self.n_top_buckets, m // t)
        idx, w = differentiable_topk(
            scores, picks, temperature=self.temperature, valid=None if valid is None else valid[:, :, 0]
        )
        kb = cache.k.reshape(b, h, m // t, t, d)
        vb = cache.v.reshape(b, h, m // t, t, -1)
        if cache.keep is not None:
            keep = cache.keep.reshape(b, 1, m // t, t)
            kb, vb = kb * keep[..., None], vb * keep[..., None]
            cache.key_mask = gather_buckets(keep.expand(b, h, m // t, t), idx).flatten(-2)[:, :, None]
        cache.keys = (gather_buckets(kb, idx) * w[..., None, None]).flatten(2, 3)
        cache.values = (gather_buckets(vb, idx) * w[..., None, None]).flatten(2, 3)

    def step_context(self, q: Tensor, cache: ContextCache, position: int) -> Tensor:
        """q [B, H, 1, D] at ``position`` -> [B, H, 1, D]."""
        cache.sum_q = cache.sum_q + q[:, :, 0]
        if position % self.bucket_size == 0:
            self._select(cache, cache.sum_q / (position + 1))
        return dense_attention(q, cache.keys, cache.values, mask=cache.key_mask)
