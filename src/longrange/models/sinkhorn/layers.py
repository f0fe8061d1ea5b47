"""The Sinkhorn layer of a block: projections, local heads and Sinkhorn heads
(``SinkhornSelfAttention``), with its decoding entries.

Differences from the reference (sinkhorn-transformer 0.11.4), on purpose:
- context attention projects the context to keys and values (``to_kv``; the reference uses
  the raw context as both);
- padded queries are not masked (their outputs are unused), and a query without any key gets
  zeros instead of a uniform average.
The attention itself lives in :mod:`~longrange.models.sinkhorn.attention` (non-causal, and
context attention) and :mod:`~longrange.models.sinkhorn.causal`.

Dimensions: B batch, H heads, N positions, M context positions, D head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.models.sinkhorn.attention import SinkhornAttention
from longrange.models.sinkhorn.causal import SinkhornCausalAttention
from longrange.modules.local_attention import LocalAttention
from longrange.ops.sinkhorn import unrotate_heads
from longrange.ops.sinkhorn.layout import merge_heads, split_heads


class SinkhornSelfAttention(nn.Module):
    """Projections, local heads and Sinkhorn heads: x [B, N, dim] -> [B, N, dim].

    The first ``n_local_attn_heads`` heads attend locally (windows of ``bucket_size``, one
    window back, and one ahead when not causal); the others are Sinkhorn heads. With
    ``context_only`` the keys and values come from ``context`` [B, M, dim] (projected by
    ``to_kv``) and ``context_mask`` masks them. ``forward(..., cache=new_cache(...))`` also
    fills a decoding cache (see :meth:`new_cache` and :meth:`step`).
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
        cache: dict | None = None,
        length: int | None = None,
    ) -> Tensor:
        """x [B, N, dim]; input_mask (alias ``mask``) [B, N]; context [B, M, dim]; context_mask
        [B, M]. With ``cache``: a fresh cache is filled with the first ``length`` positions
        (all by default); a filled one takes one new position, x [B, 1, dim]."""
        input_mask = mask if input_mask is None else input_mask
        if cache is not None and cache["length"] > 0:
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
    def _fill(self, cache: dict, q: Tensor, k: Tensor, v: Tensor, kv_mask, length: int) -> None:
        lh = self.n_local_attn_heads
        attn = self.sinkhorn_attention
        if self.context_only:
            cache["context"] = attn.prefill_context(q[:, lh:], k[:, lh:], v[:, lh:], kv_mask, length)
        elif not self.causal:
            raise ValueError("incremental decoding needs causal self-attention")
        else:
            if lh:
                cache["local_k"][:, :, :length] = k[:, :lh, :length]
                cache["local_v"][:, :, :length] = v[:, :lh, :length]
            if lh < self.heads:
                attn.prefill(q[:, lh:], k[:, lh:], v[:, lh:], cache["causal"], length)
        cache["length"] = length

    def new_cache(self, batch: int, capacity: int, like: Tensor) -> dict:
        """An empty decoding cache for up to ``capacity`` positions: ``length`` (positions
        seen), the local heads' keys and values ``local_k`` / ``local_v`` [B, H_local,
        capacity, D], the Sinkhorn heads' :class:`~longrange.models.sinkhorn.causal.CausalCache`
        ``causal``, or a context layer's ``context`` (set by the first call)."""
        cache: dict = {"length": 0}
        if self.context_only:
            return cache
        if not self.causal:
            raise ValueError("incremental decoding needs causal self-attention")
        if self.n_local_attn_heads:
            shape = (batch, self.n_local_attn_heads, capacity, self.dim_head)
            cache["local_k"], cache["local_v"] = like.new_zeros(shape), like.new_zeros(shape)
        if self.n_local_attn_heads < self.heads:
            cache["causal"] = self.sinkhorn_attention.new_cache(batch, capacity, like)
        return cache

    def step(self, x: Tensor, cache: dict) -> Tensor:
        """x [B, 1, dim] at position ``cache["length"]`` -> [B, 1, dim]."""
        p, lh = cache["length"], self.n_local_attn_heads
        (q,) = split_heads(self.to_q(x), 1, self.heads)
        outs = []
        if self.context_only:
            outs.append(self.sinkhorn_attention.step_context(q, cache["context"], p))
        else:
            k, v = split_heads(self.to_kv(x), 2, self.heads)
            if lh:
                local_k, local_v = cache["local_k"], cache["local_v"]
                # slices, not an integer index, which would fix a compiled step to one position
                local_k[:, :, p : p + 1] = k[:, :lh]
                local_v[:, :, p : p + 1] = v[:, :lh]
                lo = max(0, p + 1 - self.local_attention.cache_length)
                lk, lv = local_k[:, :, lo : p + 1], local_v[:, :, lo : p + 1]
                outs.append(self.local_attention.step(q[:, :lh], lk, lv, position=p))
            if lh < self.heads:
                outs.append(self.sinkhorn_attention.step(q[:, lh:], k[:, lh:], v[:, lh:], cache["causal"], p))
        cache["length"] = p + 1
        return self.dropout(self.to_out(merge_heads(*outs)))
