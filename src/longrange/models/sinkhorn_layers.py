"""Sinkhorn attention layers: the reference's ``SinkhornAttention``, ``SinkhornCausalAttention``
and ``SinkhornSelfAttention``, on :mod:`longrange.ops.sinkhorn`, with decoding caches.

Differences from the reference (sinkhorn-transformer 0.11.4), on purpose:
- the non-SortCut path reorders the *values* with the chosen buckets (the reference reorders
  the keys twice and uses them as values);
- the causal padding mask follows the ``n_top_buckets`` null buckets (the reference always
  pads two);
- context attention projects the context to keys and values (``to_kv``; the reference uses
  the raw context as both);
- with ``causal_queries`` (context attention inside a causal decoder) each query bucket picks
  its own context buckets (top-k, also when ``non_permutative=False``: a Sinkhorn column
  normalisation would mix later buckets in) from the running mean of the queries up to its
  first position, and there is no "own" context bucket (whether one exists would depend on
  the decoder length);
- Sinkhorn (``non_permutative=False``) with ``n_top_buckets`` K > 1 gives query bucket u the
  sorted rows u .. u + K - 1 (cyclic); the reference silently uses one. Sinkhorn with SortCut
  sorts the U buckets and keeps the first ``n_sortcut`` rows (the reference's one-row
  Sinkhorn degenerates to the plain sum of all buckets);
- padded queries are not masked (their outputs are unused), and a query without any key gets
  zeros instead of a uniform average.

Dimensions: B batch, H heads, N positions, U query buckets of S, V key buckets of T,
P null buckets, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.models.sinkhorn_sortnets import (
    AttentionSortNet,
    BucketChoice,
    CausalAttentionSortNet,
    CausalSimpleSortNet,
    SimpleSortNet,
)
from longrange.modules.local_attention import LocalAttention
from longrange.ops.dense import dense_attention
from longrange.ops.sinkhorn import (
    causal_sinkhorn_attention,
    causal_sinkhorn_attention_naive,
    causal_sinkhorn_step,
    cumulative_mean,
    dense_selection,
    differentiable_topk,
    gather_buckets,
    key_bucket_valid,
    rotate_heads,
    sinkhorn_attention,
    sinkhorn_attention_naive,
    unrotate_heads,
)
from longrange.ops.sinkhorn.layout import merge_heads, split_heads

BACKENDS = ("auto", "naive")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


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
        _check_backend(backend)
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


@dataclass
class _HeadGroup:
    """Causal decoding state of the heads that share one bucket phase."""

    start: int
    stop: int
    offset: int
    sum_q: Tensor  # [B, Hg, D]
    sum_k: Tensor
    ck_sum: Tensor  # sum over the current bucket of the running mean of the keys
    sk: Tensor  # [B, Hg, U_cap, D]: the same sum for every finished bucket
    indices: Tensor | None = None  # [B, Hg, P]: the current bucket's picks
    weights: Tensor | None = None


@dataclass
class CausalCache:
    """Decoding state of one causal Sinkhorn layer: all past keys / values (the picked
    buckets are read from here) and the sort state per head group."""

    k: Tensor  # [B, H, L_cap, D]
    v: Tensor
    groups: list[_HeadGroup] = field(default_factory=list)


class SinkhornCausalAttention(nn.Module):
    """Causal Sinkhorn heads: q, k, v [B, H, N, D] -> [B, H, N, D]; heads H // 2 .. are shifted
    by S - 1; ``n_top_buckets`` learned null buckets."""

    def __init__(
        self,
        bucket_size: int,
        dim: int,
        dim_heads: int,
        heads: int,
        max_seq_len: int | None,
        dropout: float = 0.0,
        kv_bucket_size: int | None = None,
        use_simple_sort_net: bool = False,
        n_top_buckets: int = 2,
        temperature: float = 1.0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_backend(backend)
        if kv_bucket_size is not None and kv_bucket_size != bucket_size:
            raise ValueError("kv_bucket_size must equal bucket_size for causal attention")
        self.bucket_size, self.heads, self.n_top_buckets = bucket_size, heads, n_top_buckets
        self.temperature, self.dropout, self.backend = temperature, dropout, backend
        self.null_keys = nn.Parameter(torch.randn(heads, 1, dim_heads))
        self.null_values = nn.Parameter(torch.randn(heads, 1, dim_heads))
        if use_simple_sort_net:
            if max_seq_len is None:
                raise ValueError("use_simple_sort_net needs max_seq_len")
            self.sort_net = CausalSimpleSortNet(
                heads, bucket_size, max_seq_len // bucket_size, n_top_buckets, dim_heads * 2, temperature
            )
        else:
            self.sort_net = CausalAttentionSortNet(heads, bucket_size, dim_heads, temperature)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, q_mask: Tensor | None = None, kv_mask=None, *, rotated=False
    ) -> Tensor:
        """q, k, v [B, H, N, D]; masks [B, N]. ``rotated``: heads H // 2 .. of q, k, v are
        already rotated left by S - 1 (:func:`~longrange.ops.sinkhorn.layout.split_heads`),
        and the output is returned the same way."""
        b, h, n, _ = q.shape
        s, half = self.bucket_size, h // 2
        mask = kv_mask if kv_mask is not None else q_mask
        if not rotated:
            q, k, v = (rotate_heads(t, half, s - 1) for t in (q, k, v))
        if mask is not None:
            mask = rotate_heads(mask[:, None].expand(b, h, n), half, s - 1)
        idx, w = self.sort_net(q, k, self.n_top_buckets, mask=mask)
        null_k, null_v = self.null_keys[:, 0], self.null_values[:, 0]
        common = dict(bucket_size=s, wrap_from=half, mask=mask)
        if self.backend == "naive":
            reorder = dense_selection(idx, w, self.n_top_buckets + n // s)
            out = causal_sinkhorn_attention_naive(q, k, v, null_k, null_v, reorder=reorder, **common)
        else:
            dropout = self.dropout if self.training else 0.0
            out = causal_sinkhorn_attention(
                q, k, v, null_k, null_v, indices=idx, weights=w, dropout=dropout, **common
            )
        return out if rotated else unrotate_heads(out, half, s - 1)

    # --- decoding -----------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int, like: Tensor) -> CausalCache:
        h, d = self.heads, self.null_keys.shape[-1]
        s, half = self.bucket_size, self.heads // 2
        zeros = lambda *shape: like.new_zeros(*shape)  # noqa: E731
        groups = []
        for start, stop, offset in ((0, half, 0), (half, h, s - 1)):
            if stop > start:
                hg = stop - start
                sk = zeros(batch, hg, capacity // s + 1, d)
                groups.append(
                    _HeadGroup(
                        start, stop, offset, zeros(batch, hg, d), zeros(batch, hg, d), zeros(batch, hg, d), sk
                    )
                )
        return CausalCache(zeros(batch, h, capacity, d), zeros(batch, h, capacity, d), groups)

    def _pick(self, group: _HeadGroup, sq: Tensor, ck: Tensor, k_first: Tensor, n_before: int) -> None:
        heads = slice(group.start, group.stop)
        sk_past = group.sk[:, :, :n_before]
        scores = self.sort_net.step_scores(sq, ck, k_first, sk_past, self.n_top_buckets, heads)
        group.indices, group.weights = differentiable_topk(
            scores, self.n_top_buckets, temperature=self.temperature
        )

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, cache: CausalCache, length: int) -> None:
        """Record the first ``length`` positions of q, k, v [B, H, >= length, D]."""
        s = self.bucket_size
        cache.k[:, :, :length] = k[:, :, :length]
        cache.v[:, :, :length] = v[:, :, :length]
        for g in cache.groups:
            n_rel = length - g.offset
            if n_rel <= 0:
                continue
            qg, kg = q[:, g.start : g.stop, g.offset : length], k[:, g.start : g.stop, g.offset : length]
            g.sum_q, g.sum_k = qg.sum(dim=2), kg.sum(dim=2)
            ck = cumulative_mean(kg)
            done = n_rel // s
            b, hg, _, d = ck.shape
            g.sk[:, :, :done] = ck[:, :, : done * s].reshape(b, hg, done, s, d).sum(dim=3)
            g.ck_sum = ck[:, :, done * s :].sum(dim=2)
            if n_rel % s:
                sq = cumulative_mean(qg[:, :, : done * s + 1])[:, :, -1]
                self._pick(g, sq, ck[:, :, done * s], kg[:, :, done * s], done)

    def step(self, q: Tensor, k: Tensor, v: Tensor, cache: CausalCache, position: int) -> Tensor:
        """q, k, v [B, H, 1, D] of the token at ``position`` -> [B, H, 1, D]."""
        s = self.bucket_size
        cache.k[:, :, position] = k[:, :, 0]
        cache.v[:, :, position] = v[:, :, 0]
        outs = []
        for g in cache.groups:
            rel = position - g.offset
            heads = slice(g.start, g.stop)
            if rel >= 0:
                g.sum_q = g.sum_q + q[:, heads, 0]
                g.sum_k = g.sum_k + k[:, heads, 0]
                ck = g.sum_k / (rel + 1)
                bucket, row = divmod(rel, s)
                if row == 0:
                    self._pick(g, g.sum_q / (rel + 1), ck, k[:, heads, 0], bucket)
                g.ck_sum = g.ck_sum + ck
                if row == s - 1:
                    g.sk[:, :, bucket] = g.ck_sum
                    g.ck_sum = torch.zeros_like(g.ck_sum)
            outs.append(
                causal_sinkhorn_step(
                    q[:, heads],
                    cache.k[:, heads, : position + 1],
                    cache.v[:, heads, : position + 1],
                    self.null_keys[heads, 0],
                    self.null_values[heads, 0],
                    indices=g.indices,
                    weights=g.weights,
                    position=position,
                    offset=g.offset,
                    bucket_size=s,
                )
            )
        return torch.cat(outs, dim=1)


@dataclass
class LayerCache:
    """Decoding state of one :class:`SinkhornSelfAttention` layer."""

    length: int = 0
    local_k: Tensor | None = None  # [B, H_local, L_cap, D]
    local_v: Tensor | None = None
    causal: CausalCache | None = None
    context: ContextCache | None = None


class SinkhornSelfAttention(nn.Module):
    """Projections, local heads and Sinkhorn heads: x [B, N, dim] -> [B, N, dim].

    The first ``n_local_attn_heads`` heads attend locally (windows of ``bucket_size``, one
    window back, and one ahead when not causal); the others are Sinkhorn heads. With
    ``context_only`` the keys and values come from ``context`` [B, M, dim] (projected by
    ``to_kv``) and ``context_mask`` masks them. ``forward(..., cache=LayerCache())`` also
    fills a decoding cache (see :meth:`step`).
    """

    def __init__(
        self,
        dim: int,
        bucket_size: int,
        max_seq_len: int | None,
        heads: int = 8,
        dim_head: int | None = None,
        kv_bucket_size: int | None = None,
        causal: bool = False,
        non_permutative: bool = True,
        sinkhorn_iter: int = 5,
        n_sortcut: int = 0,
        temperature: float = 0.75,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        context_only: bool = False,
        use_simple_sort_net: bool = False,
        n_local_attn_heads: int = 0,
        n_top_buckets: int = 1,
        *,
        causal_queries: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim_head is None and dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when dim_head is None")
        if causal and n_sortcut > 0:
            raise ValueError("n_sortcut (SortCut) can only be used for non-causal attention")
        if causal and context_only:
            raise ValueError("a context_only attention layer cannot be causal (use causal_queries)")
        if not 0 <= n_local_attn_heads <= heads:
            raise ValueError(f"n_local_attn_heads must lie in [0, heads={heads}], got {n_local_attn_heads}")
        if context_only and n_local_attn_heads:
            raise ValueError("context_only attention has no local heads (n_local_attn_heads must be 0)")
        if n_top_buckets < 1:
            raise ValueError(f"n_top_buckets must be >= 1, got {n_top_buckets}")
        self.dim_head = dim_head or dim // heads
        dim_heads = self.dim_head * heads
        self.heads, self.bucket_size = heads, bucket_size
        self.kv_bucket_size = kv_bucket_size or bucket_size
        self.causal, self.context_only = causal, context_only
        self.n_local_attn_heads = n_local_attn_heads
        self.to_q = nn.Linear(dim, dim_heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_heads * 2, bias=False)
        self.to_out = nn.Linear(dim_heads, dim)
        self.local_attention = LocalAttention(
            bucket_size, causal, dropout=attn_dropout, look_forward=0 if causal else 1
        )
        sink_heads = heads - n_local_attn_heads
        if causal:
            self.sinkhorn_attention: nn.Module = SinkhornCausalAttention(
                bucket_size, dim, self.dim_head, sink_heads, max_seq_len, dropout=attn_dropout,
                kv_bucket_size=kv_bucket_size, use_simple_sort_net=use_simple_sort_net,
                n_top_buckets=n_top_buckets, temperature=temperature, backend=backend,
            )  # fmt: skip
        else:
            self.sinkhorn_attention = SinkhornAttention(
                bucket_size, dim, self.dim_head, sink_heads, max_seq_len, temperature=temperature,
                non_permutative=non_permutative, sinkhorn_iter=sinkhorn_iter, n_sortcut=n_sortcut,
                dropout=attn_dropout, kv_bucket_size=kv_bucket_size,
                use_simple_sort_net=use_simple_sort_net, n_top_buckets=n_top_buckets,
                causal_queries=causal_queries, backend=backend,
            )  # fmt: skip
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        length: int | None = None,
    ) -> Tensor:
        """x [B, N, dim]; input_mask (alias ``mask``) [B, N]; context [B, M, dim]; context_mask
        [B, M]. With ``cache``: a fresh cache is filled with the first ``length`` positions
        (all by default); a filled one takes one new position, x [B, 1, dim]."""
        input_mask = mask if input_mask is None else input_mask
        if cache is not None and cache.length > 0:
            return self.step(x, cache)
        b, n, d = x.shape
        if n % self.bucket_size:
            raise ValueError(f"sequence length {n} must be divisible by bucket_size {self.bucket_size}")
        if self.context_only and context is None:
            raise ValueError("context_only attention needs context (keys / values to attend to)")
        if context is not None and (context.shape[0], context.shape[2]) != (b, d):
            raise ValueError(
                f"context must be [B={b}, M, dim={d}] like the input, got {tuple(context.shape)}"
            )
        source = context if self.context_only else x
        kv_mask = context_mask if self.context_only else input_mask
        if source.shape[1] % self.kv_bucket_size:
            raise ValueError(
                f"key / value length {source.shape[1]} must be divisible by the key bucket size "
                f"{self.kv_bucket_size}"
            )
        lh, rotate_from, shift = self.n_local_attn_heads, self.heads, 0
        if self.context_only:
            (q,) = split_heads(self.to_q(x), 1, self.heads)
            k, v = split_heads(self.to_kv(source), 2, self.heads)
        else:
            if self.causal:
                # the second half of the Sinkhorn heads works on buckets shifted by S - 1
                rotate_from, shift = lh + (self.heads - lh) // 2, self.bucket_size - 1
            weight = torch.cat([self.to_q.weight, self.to_kv.weight], dim=0)
            q, k, v = split_heads(F.linear(x, weight), 3, self.heads, rotate_from=rotate_from, shift=shift)
        outs = []
        if lh:
            outs.append(self.local_attention(q[:, :lh], k[:, :lh], v[:, :lh], input_mask=input_mask))
        if lh < self.heads:
            sq, sk, sv = (t[:, lh:] if lh else t for t in (q, k, v))
            extra = {"rotated": True} if self.causal else {}
            outs.append(self.sinkhorn_attention(sq, sk, sv, q_mask=input_mask, kv_mask=kv_mask, **extra))
        if cache is not None:
            if shift:
                q, k, v = (unrotate_heads(t, rotate_from, shift) for t in (q, k, v))
            self._fill(cache, q, k, v, kv_mask, n if length is None else length)
        out = merge_heads(*outs, rotate_from=rotate_from, shift=shift)
        return self.dropout(self.to_out(out))

    # --- decoding -----------------------------------------------------------------------
    def _fill(self, cache: LayerCache, q: Tensor, k: Tensor, v: Tensor, kv_mask, length: int) -> None:
        lh = self.n_local_attn_heads
        attn = self.sinkhorn_attention
        if self.context_only:
            cache.context = attn.prefill_context(q[:, lh:], k[:, lh:], v[:, lh:], kv_mask, length)
        elif not self.causal:
            raise ValueError("incremental decoding needs causal self-attention")
        else:
            if lh:
                cache.local_k[:, :, :length] = k[:, :lh, :length]
                cache.local_v[:, :, :length] = v[:, :lh, :length]
            if lh < self.heads:
                attn.prefill(q[:, lh:], k[:, lh:], v[:, lh:], cache.causal, length)
        cache.length = length

    def new_cache(self, batch: int, capacity: int, like: Tensor) -> LayerCache:
        """An empty cache for up to ``capacity`` positions."""
        cache = LayerCache()
        if self.context_only:
            return cache
        if not self.causal:
            raise ValueError("incremental decoding needs causal self-attention")
        if self.n_local_attn_heads:
            shape = (batch, self.n_local_attn_heads, capacity, self.dim_head)
            cache.local_k, cache.local_v = like.new_zeros(shape), like.new_zeros(shape)
        if self.n_local_attn_heads < self.heads:
            cache.causal = self.sinkhorn_attention.new_cache(batch, capacity, like)
        return cache

    def step(self, x: Tensor, cache: LayerCache) -> Tensor:
        """x [B, 1, dim] at position ``cache.length`` -> [B, 1, dim]."""
        p, lh = cache.length, self.n_local_attn_heads
        (q,) = split_heads(self.to_q(x), 1, self.heads)
        outs = []
        if self.context_only:
            outs.append(self.sinkhorn_attention.step_context(q, cache.context, p))
        else:
            k, v = split_heads(self.to_kv(x), 2, self.heads)
            if lh:
                cache.local_k[:, :, p] = k[:, :lh, 0]
                cache.local_v[:, :, p] = v[:, :lh, 0]
                lo = max(0, p + 1 - self.local_attention.cache_length)
                lk, lv = cache.local_k[:, :, lo : p + 1], cache.local_v[:, :, lo : p + 1]
                outs.append(self.local_attention.step(q[:, :lh], lk, lv, position=p))
            if lh < self.heads:
                outs.append(self.sinkhorn_attention.step(q[:, lh:], k[:, lh:], v[:, lh:], cache.causal, p))
        cache.length = p + 1
        return self.dropout(self.to_out(merge_heads(*outs)))
