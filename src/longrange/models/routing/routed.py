"""The routed heads of the Routing Transformer and when their centroids move.

- :class:`~longrange.ops.routing.kmeans.Kmeans` holds the centroids; this module decides
  when they may move: only in training, never while a reversible stack recomputes.
- :class:`KmeansAttention` (the reference's name and keywords) picks the routing for its
  use: strictly causal routing for causal self attention, the reference's balanced routing
  for non-causal attention, and assigned routing (each query to its own nearest cluster) for
  cross attention in a causal model. Memory key/values per cluster (at least one when causal).
- :class:`KmeansUpdateHandle` updates the k-means once at the end of every backward pass that
  reaches a module's parameters (post-accumulate-grad hooks plus one queued engine callback);
  ``remove()`` really removes it. :class:`KmeansUpdates` gives a module the reference's
  ``update_kmeans`` / ``cancel_kmeans_update`` on top of it.

Causal decoding: a routed layer keeps per-cluster ring buffers of the last W routed keys and
values (:class:`RoutedCache`); a new token's cluster depends on itself only. Routed cross
attention caches the context's routed keys at the first call (:class:`ContextCache`).

Dimensions: B batch, H heads, N positions, M context positions, D head width, C clusters.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrange.checks import positive_int
from longrange.models.state import state_entry
from longrange.modules.reversible import in_recomputation
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

# How many branch recomputations (activation checkpointing) are running: the forward already
# made their k-means updates. A plain global, as modules.reversible's flag, so that
# torch.compile can guard on it.
_REPLAYING = [0]


@contextmanager
def replaying() -> Iterator[None]:
    """While a branch is recomputed for backward: no k-means update."""
    _REPLAYING[0] += 1
    try:
        yield
    finally:
        _REPLAYING[0] -= 1


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


class KmeansUpdates:
    """The reference's k-means controls for an ``nn.Module`` holding routed attention."""

    _handle: KmeansUpdateHandle | None = None

    # A copy (copy.deepcopy, pickle) registers its own handle: the hooks live on the original's
    # parameters and the handle names the original module, so a copied handle would leave the
    # copy's centroids fixed through training, and a weak reference does not pickle.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_kmeans_update_registered"] = state.pop("_handle", None) is not None
        return state

    def __setstate__(self, state: dict) -> None:
        registered = state.pop("_kmeans_update_registered", False)
        super().__setstate__(state)
        if registered:
            self.register_kmeans_update()

    def register_kmeans_update(self) -> KmeansUpdateHandle:
        """Update the k-means after every backward pass (replacing an earlier handle)."""
        self.cancel_kmeans_update()
        self._handle = KmeansUpdateHandle(self)
        return self._handle

    def cancel_kmeans_update(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def update_kmeans(self) -> int:
        """Apply the pending k-means updates now (what the backward handle does)."""
        return update_kmeans(self)


@state_entry
@dataclass
class RoutedCache:
    """Decoding state of one routed attention: ring buffers of the W most recent keys and
    values per cluster ([B, H, C, W, D]) and how many tokens each cluster has seen."""

    k_buf: Tensor | None = None
    v_buf: Tensor | None = None
    counts: Tensor | None = None


@state_entry
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
        positive_int("window_size", window_size)
        if context_window_size is not None:
            positive_int("context_window_size", context_window_size)
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
        return self.training and not in_recomputation() and not _REPLAYING[0]

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

    def _route_pairs(self, q: Tensor, k: Tensor, mask: Tensor | None, paired: bool, need_dists: bool = True):
        """k-means over queries and keys; returns (dists or None, buckets, loss, keys to attend)."""
        if self.shared_qk:
            keys = F.normalize(k, dim=-1)
            # with shared query/key projections the queries are the keys before normalising
            points = keys if k is q else F.normalize(q, dim=-1)
            dists, buckets, loss = self.kmeans(
                points,
                weights=mask,
                update_means=self._update(),
                normalized=True,
                need_similarities=need_dists,
            )
            return dists, buckets, loss, keys
        weights = None if mask is None else torch.cat((mask, mask), dim=-1)
        dists, buckets, loss = self.kmeans(
            torch.cat((q, k), dim=2),
            paired=paired,
            weights=weights,
            update_means=self._update(),
            need_similarities=need_dists,
        )
        return dists, buckets, loss, k

    def _causal(self, q, k, v, mask, cache: RoutedCache | None):
        n = q.shape[2]
        if cache is not None and cache.k_buf is not None:
            return self._step(q, k, v, cache)
        _, buckets, loss, keys = self._route_pairs(q, k, mask, paired=True, need_dists=False)
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
