"""Causal Sinkhorn attention over heads: the reference's ``SinkhornCausalAttention``, on
:mod:`longrange.ops.sinkhorn`, with its decoding state (all past keys / values and the sort
state of the current bucket per head group, so a token costs one bucket-sized attention).

Differences from the reference (sinkhorn-transformer 0.11.4), on purpose: the padding mask
follows the ``n_top_buckets`` null buckets (the reference always pads two).

Dimensions: B batch, H heads (Hg in one group), N positions, S bucket size, U buckets,
P null buckets, D head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from longrange.models.sinkhorn.attention import check_backend
from longrange.models.sinkhorn.sortnets import CausalAttentionSortNet, CausalSimpleSortNet
from longrange.models.state import state_entry
from longrange.ops.sinkhorn import (
    causal_sinkhorn_attention,
    causal_sinkhorn_attention_naive,
    causal_sinkhorn_step,
    cumulative_mean,
    dense_selection,
    differentiable_topk,
    picked_buckets,
    rotate_heads,
    unrotate_heads,
)


@state_entry
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
    # the picked buckets of the key / value caches, scaled [B, Hg, P * S, D]: formed at the
    # bucket's first step (None until then, and after a new pick)
    picked_k: Tensor | None = None
    picked_v: Tensor | None = None


@state_entry
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
        check_backend(backend)
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
        group.picked_k = group.picked_v = None

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
        cache.k[:, :, position : position + 1] = k  # (a slice: see SinkhornSelfAttention.step)
        cache.v[:, :, position : position + 1] = v
        outs = []
        for g in cache.groups:
            rel = position - g.offset
            heads = slice(g.start, g.stop)
            if rel >= 0:
                g.sum_q = g.sum_q + q[:, heads, 0]
                g.sum_k = g.sum_k + k[:, heads, 0]
                ck = g.sum_k / (rel + 1)
                bucket, row = rel // s, rel % s  # (divmod does not trace)
                if row == 0:
                    self._pick(g, g.sum_q / (rel + 1), ck, k[:, heads, 0], bucket)
                g.ck_sum = g.ck_sum + ck
                if row == s - 1:
                    g.sk[:, :, bucket] = g.ck_sum
                    g.ck_sum = torch.zeros_like(g.ck_sum)
            keys, values = cache.k[:, heads, : position + 1], cache.v[:, heads, : position + 1]
            null_k, null_v = self.null_keys[heads, 0], self.null_values[heads, 0]
            if rel >= 0 and g.picked_k is None:  # the bucket's first step (or a loaded state)
                common = dict(offset=g.offset, bucket_size=s)
                g.picked_k = picked_buckets(keys, null_k, g.indices, g.weights, **common)
                g.picked_v = picked_buckets(values, null_v, g.indices, g.weights, **common)
            outs.append(
                causal_sinkhorn_step(
                    q[:, heads],
                    keys,
                    values,
                    null_k,
                    null_v,
                    indices=g.indices,
                    weights=g.weights,
                    position=position,
                    offset=g.offset,
                    bucket_size=s,
                    picked=None if rel < 0 else (g.picked_k, g.picked_v),
                )
            )
        return torch.cat(outs, dim=1)
