"""The Routing Transformer's attention layers: k-means routed heads beside local heads.

- :class:`~longrange.ops.routing.kmeans.Kmeans` holds the centroids; this module decides
  when they may move: only in training, never while a reversible stack recomputes.
- :class:`KmeansAttention` (the reference's name and keywords): picks the routing for its
  use: strictly causal routing for causal self attention, the reference's balanced routing
  for non-causal attention, and assigned routing (each query to its own nearest cluster) for
  cross attention in a causal model. Memory key/values per cluster (at least one when causal).
- :class:`SelfAttention` (the reference's name and keywords): local heads on
  :class:`~longrange.modules.local_attention.LocalAttention` plus routed heads with rotary
  positions (on queries, keys and values, as the reference rotates them), or cross attention
  to a context.
- :class:`KmeansUpdateHandle`: updates the k-means once at the end of every backward pass that
  reaches a module's parameters (post-accumulate-grad hooks plus one queued engine callback);
  ``remove()`` really removes it.

Causal decoding: every layer keeps a cache (local keys/values of the last window, per-cluster
ring buffers of the last W routed keys/values); a new token's cluster depends on itself only.

Dimensions: B batch, H heads, N positions, M context positions, D head width, C clusters.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrange.modules.local_attention import LocalAttention
from longrange.modules.reversible import in_recomputation
from longrange.modules.rotary import RotaryEmbedding
from longrange.ops.routing import (
    assigned_routed_attention,
    assigned_routed_step,
    balanced_routed_attention,
    causal_routed_attention,
    causal_routed_step,
    cluster_keys,
    cluster_topk,
    push_ring,
    ring_buffers,
)
from longrange.ops.routing.kmeans import Kmeans, similarities


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def update_kmeans(module: nn.Module) -> int:
    """Apply the pending update of every :class:`Kmeans` in ``module``; returns how many moved."""
    seen, moved = set(), 0
    for m in module.modules():
        if isinstance(m, Kmeans) and id(m) not in seen:
            seen.add(id(m))
            moved += int(m.update())
    return moved


class KmeansUpdateHandle:
    """Run :func:`update_kmeans` on ``module`` once at the end of each backward pass that
    accumulates a gradient into any of its parameters. ``remove()`` detaches it."""

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)
        self._queued = False
        self.updates = 0
        params = {id(p): p for p in module.parameters() if p.requires_grad}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params.values()]

    def _on_grad(self, _param: Tensor) -> None:
        if self._queued:
            return
        self._queued = True
        # One callback at the very end of the backward pass: after every reversible block has
        # been recomputed, so the centroids never change under a recomputation.
        torch.autograd.Variable._execution_engine.queue_callback(self._run)

    def _run(self) -> None:
        self._queued = False
        module = self._module()
        if module is not None and update_kmeans(module):
            self.updates += 1  # backward passes that moved some centroids

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def active(self) -> bool:
        return bool(self._hooks)


@dataclass
class RoutedCache:
    """Decoding state of one routed attention: ring buffers of the W most recent keys and
    values per cluster ([B, H, C, W, D]) and how many tokens each cluster has seen."""

    k_buf: Tensor | None = None
    v_buf: Tensor | None = None
    counts: Tensor | None = None


@dataclass
class ContextCache:
    """Decoding state of one routed cross attention: every cluster's memory keys and the
    context keys it took ([B, H, C, K + Wk, D]), their values, and which of them are real."""

    keys: Tensor | None = None
    values: Tensor | None = None
    kept: Tensor | None = None


class KmeansAttention(nn.Module):
    """Routed attention over q, k, v [B, H, N, D] (k, v [B, H, M, D] with a context).

    Returns ``(out [B, H, N, D], aux_loss)``. ``query_mask`` [B, N] and ``key_mask`` [B, M] are
    padding masks (True = keep); without a context ``key_mask`` defaults to ``query_mask``.
    """

    def __init__(
        self,
        num_clusters: int,
        window_size: int,
        num_heads: int,
        head_dim: int,
        causal: bool = False,
        dropout: float = 0.0,
        ema_decay: float = 0.999,
        commitment: float = 1e-4,
        context_window_size: int | None = None,
        receives_context: bool = False,
        num_mem_kv: int = 0,
        shared_qk: bool = False,
    ) -> None:
        super().__init__()
        _positive_int("window_size", window_size)
        if context_window_size is not None:
            _positive_int("context_window_size", context_window_size)
        if isinstance(num_mem_kv, bool) or not isinstance(num_mem_kv, int) or num_mem_kv < 0:
            raise ValueError(f"num_mem_kv must be a non-negative integer, got {num_mem_kv!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attn_dropout must lie in [0, 1), got {dropout!r}")
        self.num_heads, self.num_clusters, self.head_dim = num_heads, num_clusters, head_dim
        self.window_size = window_size
        self.context_window_size = window_size if context_window_size is None else context_window_size
        self.causal = causal
        self.receives_context = receives_context
        self.shared_qk = shared_qk
        self.dropout = dropout
        self.kmeans = Kmeans(num_heads, head_dim, num_clusters, ema_decay, commitment)
        # A causal query may have no earlier key of its cluster: the memory key defines it.
        self.num_mem_kv = max(num_mem_kv, 1 if causal and not receives_context else 0)
        self.mem_key = nn.Parameter(torch.randn(num_heads, num_clusters, self.num_mem_kv, head_dim))
        self.mem_value = nn.Parameter(torch.randn(num_heads, num_clusters, self.num_mem_kv, head_dim))
        self.checkpoint = False  # recompute the causal routed op in backward (less memory)

    def _update(self) -> bool:
        return self.training and not in_recomputation()

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        query_mask: Tensor | None = None,
        key_mask: Tensor | None = None,
        *,
        cache: RoutedCache | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        if self.receives_context:
            return self._cross(q, k, v, query_mask, key_mask, cache)
        key_mask = query_mask if key_mask is None else key_mask
        if self.causal:
            return self._causal(q, k, v, query_mask, cache)
        return self._balanced(q, k, v, query_mask, key_mask)

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def _route_pairs(self, q: Tensor, k: Tensor, mask: Tensor | None, paired: bool):
        """k-means over queries and keys; returns (dists, buckets, loss, keys to attend)."""
        if self.shared_qk:
            keys = F.normalize(k, dim=-1)
            # with shared query/key projections the queries are the keys before normalising
            points = keys if k is q else F.normalize(q, dim=-1)
            dists, buckets, loss = self.kmeans(
                points, weights=mask, update_means=self._update(), normalized=True
            )
            return dists, buckets, loss, keys
        weights = None if mask is None else torch.cat((mask, mask), dim=-1)
        dists, buckets, loss = self.kmeans(
            torch.cat((q, k), dim=2), paired=paired, weights=weights, update_means=self._update()
        )
        return dists, buckets, loss, k

    def _causal(self, q, k, v, mask, cache: RoutedCache | None):
        n = q.shape[2]
        if cache is not None and cache.k_buf is not None:
            return self._step(q, k, v, cache)
        _, buckets, loss, keys = self._route_pairs(q, k, mask, paired=True)
        clusters = buckets[:, :, :n]
        options = dict(
            window_size=self.window_size, mask=mask, shared_qk=self.shared_qk, dropout=self._dropout()
        )
        args = (q, keys, v, clusters)
        if self.checkpoint and torch.is_grad_enabled():
            # keep only the inputs; the blocked spans are rebuilt in backward (exact: the RNG
            # state for dropout is replayed)
            out = checkpoint(
                causal_routed_attention,
                *args,
                mem_k=self.mem_key,
                mem_v=self.mem_value,
                use_reentrant=False,
                **options,
            )
        else:
            out = causal_routed_attention(*args, mem_k=self.mem_key, mem_v=self.mem_value, **options)
        if cache is not None:
            cache.k_buf, cache.v_buf, cache.counts = ring_buffers(
                keys, v, clusters, num_clusters=self.num_clusters, window_size=self.window_size
            )
        return out, loss

    @torch.no_grad()
    def _step(self, q: Tensor, k: Tensor, v: Tensor, cache: RoutedCache) -> tuple[Tensor, Tensor]:
        if q.shape[2] != 1:
            raise ValueError(f"a decoding step takes one token per row, got {q.shape[2]}")
        means = self.kmeans.means.to(q.dtype)
        qn = F.normalize(q, dim=-1)
        if self.shared_qk:
            keys = qn
            score = similarities(qn, means)
        else:
            keys = k
            score = similarities(qn, means) + similarities(F.normalize(k, dim=-1), means)
        clusters = score.argmax(dim=-1)[:, :, 0]  # [B, H]
        push_ring(cache.k_buf, cache.v_buf, cache.counts, keys, v, clusters)
        out = causal_routed_step(
            q,
            cache.k_buf,
            cache.v_buf,
            cache.counts,
            clusters,
            mem_k=self.mem_key,
            mem_v=self.mem_value,
            shared_qk=self.shared_qk,
        )
        return out, q.new_zeros(())

    def _balanced(self, q, k, v, query_mask, key_mask):
        n, m = q.shape[2], k.shape[2]
        dists, _, loss, keys = self._route_pairs(q, k, query_mask, paired=False)
        if self.shared_qk:
            q_dists = k_dists = dists
        else:
            q_dists, k_dists = dists[:, :, :n], dists[:, :, n:]
        # padded tokens are taken last, so they never displace a real token
        if query_mask is not None:
            q_dists = q_dists.masked_fill(~query_mask[:, None, :, None], float("-inf"))
        if key_mask is not None:
            k_dists = k_dists.masked_fill(~key_mask[:, None, :, None], float("-inf"))
        q_index = cluster_topk(q_dists, min(self.window_size, n))
        k_index = q_index if self.shared_qk else cluster_topk(k_dists, min(self.window_size, m))
        out = balanced_routed_attention(
            q,
            keys,
            v,
            q_index,
            k_index,
            mem_k=self.mem_key,
            mem_v=self.mem_value,
            q_mask=query_mask,
            k_mask=key_mask,
            shared_qk=self.shared_qk,
            dropout=self._dropout(),
        )
        return out, loss

    def _cross(self, q, k, v, query_mask, key_mask, cache: ContextCache | None = None):
        if cache is not None and cache.keys is not None:
            with torch.no_grad():
                clusters = similarities(F.normalize(q, dim=-1), self.kmeans.means).argmax(dim=-1)[:, :, 0]
                out = assigned_routed_step(q, clusters, cache.keys, cache.values, cache.kept)
            return out, q.new_zeros(())
        n, m = q.shape[2], k.shape[2]
        b = q.shape[0]
        weights = None
        if query_mask is not None or key_mask is not None:
            qm = query_mask if query_mask is not None else q.new_ones(b, n, dtype=torch.bool)
            km = key_mask if key_mask is not None else q.new_ones(b, m, dtype=torch.bool)
            weights = torch.cat((qm, km), dim=-1)
        dists, _, loss = self.kmeans(torch.cat((q, k), dim=2), weights=weights, update_means=self._update())
        q_dists, k_dists = dists[:, :, :n], dists[:, :, n:]
        if key_mask is not None:
            k_dists = k_dists.masked_fill(~key_mask[:, None, :, None], float("-inf"))
        k_index = cluster_topk(k_dists, min(self.context_window_size, m))
        common = dict(mem_k=self.mem_key, mem_v=self.mem_value, q_mask=query_mask, k_mask=key_mask)
        if self.causal:
            clusters = q_dists.argmax(dim=-1)
            out = assigned_routed_attention(q, k, v, clusters, k_index, dropout=self._dropout(), **common)
            if cache is not None:
                cache.keys, cache.values, cache.kept = cluster_keys(
                    k, v, k_index, mem_k=self.mem_key, mem_v=self.mem_value, k_mask=key_mask
                )
            return out, loss
        if query_mask is not None:
            q_dists = q_dists.masked_fill(~query_mask[:, None, :, None], float("-inf"))
        q_index = cluster_topk(q_dists, min(self.window_size, n))
        out = balanced_routed_attention(q, k, v, q_index, k_index, dropout=self._dropout(), **common)
        return out, loss


@dataclass
class AttentionCache:
    """Decoding state of one :class:`SelfAttention`: the local heads' recent (unrotated) keys
    and values and the routed heads' :class:`RoutedCache`."""

    position: int = 0
    local_k: Tensor | None = None
    local_v: Tensor | None = None
    routed: RoutedCache | ContextCache | None = None


class SelfAttention(nn.Module):
    """Local heads plus k-means routed heads (or cross attention to a context): x [B, N, dim]
    -> (out [B, N, dim], aux_loss).

    ``pos_emb``: absolute positions [N] (long) or the reference's sinusoid table [1, N,
    dim_head] (sines then cosines); the routed heads' queries, keys and values are rotated by
    it (interleaved pairs, as the reference does). ``conv_query_kernel`` is accepted for
    signature compatibility; the reference never used it, so only its default is allowed.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        max_seq_len: int,
        heads: int,
        local_attn_heads: int,
        window_size: int,
        dim_head: int | None = None,
        local_attn_window_size: int | None = None,
        local_attn_radius_blocks: int = 1,
        causal: bool = False,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
        kmeans_ema_decay: float = 0.999,
        commitment_factor: float = 1e-4,
        receives_context: bool = False,
        context_window_size: int | None = None,
        rel_pos_emb: bool = True,
        num_mem_kv: int = 0,
        shared_qk: bool = False,
        conv_query_kernel: int = 9,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("max_seq_len", max_seq_len)):
            _positive_int(name, value)
        _positive_int("window_size", window_size)
        if dim_head is None and dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when dim_head is None")
        if max_seq_len % window_size:
            raise ValueError(
                f"max_seq_len ({max_seq_len}) must be divisible by window_size ({window_size}): "
                "it sets the number of clusters"
            )
        if not 0 <= local_attn_heads <= heads:
            raise ValueError(f"n_local_attn_heads must lie in [0, heads={heads}], got {local_attn_heads}")
        if receives_context and local_attn_heads:
            raise ValueError("local attention heads cannot attend to a context (receives_context=True)")
        if conv_query_kernel != 9:
            raise ValueError("conv_query_kernel is not used by the Routing Transformer; leave it at 9")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attn_layer_dropout must lie in [0, 1), got {dropout!r}")
        dim_head = dim // heads if dim_head is None else dim_head
        _positive_int("dim_head", dim_head)
        self.heads, self.dim_head = heads, dim_head
        self.local_attn_heads = local_attn_heads
        self.global_attn_heads = heads - local_attn_heads
        self.causal, self.receives_context, self.shared_qk = causal, receives_context, shared_qk
        num_clusters = max_seq_len // window_size

        if self.local_attn_heads:
            local_window = window_size if local_attn_window_size is None else local_attn_window_size
            _positive_int("local_attn_window_size", local_window)
            self.local_attn = LocalAttention(
                window_size=local_window,
                causal=causal,
                look_backward=local_attn_radius_blocks,
                look_forward=0 if causal else local_attn_radius_blocks,
                dropout=attn_dropout,
                rel_pos_emb_config=(dim_head, local_attn_heads) if rel_pos_emb else None,
                autopad=True,
            )
            self.local_to_qkv = nn.Linear(dim, 3 * dim_head * local_attn_heads)
        global_width = dim_head * self.global_attn_heads
        if self.global_attn_heads:
            self.global_attn = KmeansAttention(
                num_clusters,
                window_size,
                self.global_attn_heads,
                dim_head,
                causal=causal,
                dropout=attn_dropout,
                ema_decay=kmeans_ema_decay,
                commitment=commitment_factor,
                context_window_size=context_window_size,
                receives_context=receives_context,
                num_mem_kv=num_mem_kv,
                shared_qk=shared_qk,
            )
            self.rotary = RotaryEmbedding(dim_head, interleaved=True)
        self.to_q = nn.Linear(dim, global_width, bias=False)
        self.to_v = nn.Linear(dim, global_width, bias=False)
        if not shared_qk:
            self.to_k = nn.Linear(dim, global_width, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        return t.view(*t.shape[:2], -1, self.dim_head).transpose(1, 2)

    def _phases(self, pos_emb: Tensor) -> Tensor:
        """Unit complex numbers [N, D / 2] rotating each interleaved feature pair."""
        if pos_emb.is_floating_point():
            # the reference's table: [1, N, D] holding sin(angles) then cos(angles)
            sin, cos = pos_emb[0].float().chunk(2, dim=-1)
        else:
            angles = pos_emb.float()[:, None] * self.rotary.inv_freq[None, :]
            sin, cos = angles.sin(), angles.cos()
        return torch.complex(cos, sin)

    @staticmethod
    def _rotate(t: Tensor, phases: Tensor) -> Tensor:
        # (x1 + i x2) * (cos + i sin): the pair (x1, x2) turned by the angle, one complex product
        turned = torch.view_as_complex(t.float().unflatten(-1, (-1, 2))) * phases
        return torch.view_as_real(turned).flatten(-2).to(t.dtype)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        input_mask: Tensor | None = None,
        context_mask: Tensor | None = None,
        pos_emb: Tensor | None = None,
        *,
        cache: AttentionCache | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor]:
        if self.receives_context and context is None and not (cache is not None and cache.position > 0):
            raise ValueError("this attention layer has receives_context=True: pass context")
        b, n, _ = x.shape
        outs = []
        loss = x.new_zeros((), dtype=torch.float32)
        step = cache is not None and cache.position > 0
        if self.local_attn_heads:
            lq, lk, lv = (self._split(t) for t in self.local_to_qkv(x).chunk(3, dim=-1))
            outs.append(self._local(lq, lk, lv, input_mask, cache, step))
        if self.global_attn_heads and self.receives_context and step:
            # the context's keys and values were routed and cached at the first call
            out, _ = self.global_attn(self._split(self.to_q(x)), None, None, cache=cache.routed)
            outs.append(out)
        elif self.global_attn_heads:
            kv_input = context if self.receives_context else x
            q, v = self._split(self.to_q(x)), self._split(self.to_v(kv_input))
            if not self.shared_qk:
                k = self._split(self.to_k(kv_input))
            else:
                k = self._split(self.to_q(kv_input)) if self.receives_context else q
            if not self.receives_context and pos_emb is not None:
                phases = self._phases(pos_emb)
                rotated_q = self._rotate(q, phases)
                k = rotated_q if k is q else self._rotate(k, phases)
                q, v = rotated_q, self._rotate(v, phases)
            routed_cache = None
            if cache is not None:
                cache.routed = cache.routed or (ContextCache() if self.receives_context else RoutedCache())
                routed_cache = cache.routed
            out, aux = self.global_attn(
                q, k, v, query_mask=input_mask, key_mask=context_mask, cache=routed_cache
            )
            loss = loss + aux
            outs.append(out)
        if cache is not None:
            cache.position += n
        out = torch.cat(outs, dim=1).transpose(1, 2).reshape(b, n, -1)
        return self.dropout(self.to_out(out)), loss

    def _local(self, q, k, v, mask, cache: AttentionCache | None, step: bool) -> Tensor:
        if cache is None:
            return self.local_attn(q, k, v, input_mask=mask)
        keep = self.local_attn.cache_length
        if not step:
            out = self.local_attn(q, k, v, input_mask=mask)
            cache.local_k, cache.local_v = k[:, :, -keep:], v[:, :, -keep:]
            return out
        cache.local_k = torch.cat((cache.local_k, k), dim=2)[:, :, -keep:]
        cache.local_v = torch.cat((cache.local_v, v), dim=2)[:, :, -keep:]
        return self.local_attn.step(q, cache.local_k, cache.local_v, position=cache.position)
