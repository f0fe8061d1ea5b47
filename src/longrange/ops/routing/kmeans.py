"""Spherical k-means per attention head: the router of the Routing Transformer.

Roy et al. 2021 ("Efficient Content-Based Sparse Attention with Routing Transformers") route
queries and keys by online k-means on the unit sphere: points are L2-normalised, the nearest
centroid is the one of largest dot product, a centroid is the normalised sum of its points,
and the centroids follow the data by an exponential moving average between optimiser steps.
A commitment loss ``mean((x - centroid(x))**2)`` pulls the points toward their centroids.

The functions are stateless; :class:`Kmeans` holds the centroids (a buffer, never a
parameter) and the Lloyd steps accumulated until :meth:`Kmeans.update` applies them. When an
update may happen (training, not during reversible recomputation) is the attention layer's
decision (``longrange.models.routing.routed``).

The centroids start from data, as in the reference implementation, with two differences
(docs/ARCHITECTURE.md, "Reference compatibility"): they are initialised by the first call in
training mode only, so that a model in eval mode is a function of its weights and a call's
result never depends on which calls came first; and only from a call that yields C distinct
points per head (queries and keys count apart; padding does not count). Drawing C centroids
from fewer points repeats some: a repeated centroid never wins a point (ties go to the first
copy) and stays dead, and a decoding step and a full forward, which round differently, break
the ties differently. A call with fewer points (a one-token prompt, a short first batch)
leaves the constructor's random centroids in place, and the next call tries again. Inside a
compiled graph, which cannot wait for the count of distinct points, the centroids missing
for want of them keep the constructor's directions and the initialisation stands.

Points may carry a weight (``weights`` [B, N] or [B, H, N], 0 or 1, e.g. a padding mask): a
point of weight 0 neither moves a centroid nor enters the commitment loss.

Dimensions: B batch, H heads, N points per row, D head width, C clusters.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.checks import positive_int
from longrange.ops.select import argmax_last

KMEANS_INIT_ITERS = 10


def _point_weights(weights: Tensor | None, x: Tensor) -> Tensor | None:
    """weights [B, N] or [B, H, N] (bool or float) -> float [B, H, N] (None stays None)."""
    if weights is None:
        return None
    w = weights[:, None] if weights.dim() == 2 else weights
    return w.to(x.dtype).expand(x.shape[:-1])


def similarities(x: Tensor, means: Tensor) -> Tensor:
    """Dot products of points x [B, H, N, D] with centroids means [H, C, D] -> [B, H, N, C]."""
    return torch.einsum("bhnd,hcd->bhnc", x, means.to(x.dtype))


def nearest(x: Tensor, means: Tensor) -> Tensor:
    """Index of the nearest centroid (largest dot product) of each point: [B, H, N] long."""
    return argmax_last(similarities(x, means))


# points per piece of :func:`nearest_in_pieces`: the similarities of one piece stay small
NEAREST_PIECE = 4096


def nearest_in_pieces(x: Tensor, means: Tensor, *, paired: bool = False) -> Tensor:
    """:func:`nearest` (``paired``: x holds N / 2 queries then their keys, and a pair's cluster
    is the one nearest to both) without the whole [B, H, N, C] similarity matrix, which has
    N * N / W entries: pieces of points at a time. Returns [B, H, N] (no gradient)."""
    n = x.shape[2] // 2 if paired else x.shape[2]
    out = []
    for start in range(0, n, NEAREST_PIECE):
        stop = min(start + NEAREST_PIECE, n)
        sims = similarities(x[:, :, start:stop], means)
        if paired:
            sims = sims + similarities(x[:, :, n + start : n + stop], means)
        out.append(argmax_last(sims))
    token = torch.cat(out, dim=-1) if len(out) > 1 else out[0]
    return torch.cat((token, token), dim=-1) if paired else token


def lloyd_step(
    x: Tensor, means: Tensor, buckets: Tensor | None = None, weights: Tensor | None = None
) -> Tensor:
    """One spherical k-means iteration over every row of the batch.

    x: [B, H, N, D] (normalised), means: [H, C, D], buckets: [B, H, N] assignments (the nearest
    centroid when None). Returns the new centroids [H, C, D]: the normalised sum of each
    cluster's points; a cluster without points keeps its centroid.
    """
    heads, clusters, dim = means.shape
    if buckets is None:
        buckets = nearest(x, means)
    w = _point_weights(weights, x)
    points = x if w is None else x * w[..., None]
    # one index_add of rows into [H * C, D] (every batch row's head h adds to cluster rows
    # h * C ..), where scatter_add_ with the index expanded over D ran several times slower
    rows = (torch.arange(heads, device=x.device)[:, None] * clusters + buckets).reshape(-1)
    sums = x.new_zeros(heads * clusters, dim).index_add_(0, rows, points.reshape(-1, dim))
    ones = torch.ones_like(buckets, dtype=x.dtype) if w is None else w
    counts = x.new_zeros(heads * clusters).index_add_(0, rows, ones.reshape(-1))
    sums, counts = sums.view(heads, clusters, dim), counts.view(heads, clusters)
    fresh = F.normalize(sums, dim=-1)
    return torch.where(counts[..., None] > 0, fresh, means.to(x.dtype))


def init_means(
    x: Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    fallback: Tensor | None = None,
) -> Tensor:
    """Centroids [H, C, D] from data: C distinct points per head, then ``iters`` Lloyd
    iterations. x: [B, H, N, D] normalised.

    Up to 2 C candidate points are drawn in random order (with weights: kept points only); per
    head, the first C that repeat no earlier candidate (cosine above :data:`SAME_DIRECTION`)
    become the centroids. Where fewer are distinct, the missing centroids are ``fallback``'s
    ([H, C, D]; default random directions): a repeated centroid would never win a point (ties
    go to the first copy) and would stay dead. With enough distinct points this is the first C
    of a random permutation (of the kept points, with weights).

    The draw has static shapes (no host read), so it traces into a compiled graph."""
    means = draw_centroids(x, num_clusters, weights, generator, fallback)[0]
    for _ in range(iters):
        means = lloyd_step(x, means, weights=weights)
    return means


# two centroids whose cosine exceeds this count as one (their similarities tie up to rounding)
SAME_DIRECTION = 1.0 - 1e-5


def draw_centroids(
    x: Tensor,
    num_clusters: int,
    weights: Tensor | None,
    generator: torch.Generator | None,
    fallback: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """:func:`init_means`'s draw, before the Lloyd iterations: (centroids [H, C, D], missing
    [H, C] bool, True where a centroid is ``fallback``'s for want of distinct points)."""
    b, h, n, d = x.shape
    pool = x.transpose(0, 1).reshape(h, b * n, d)
    count = b * n
    size = 2 * num_clusters  # candidates: room for repeats among the first C
    w = _point_weights(weights, x)
    if w is None:
        order = torch.randperm(count, generator=generator, device="cpu").to(x.device)
        usable = count
    else:
        # A point is a candidate when every head keeps it (padding masks are per token).
        keep = (w > 0).all(dim=1).reshape(count)
        keys = torch.rand(count, generator=generator, device="cpu").to(x.device) + keep.to(x.dtype)
        order = keys.argsort(descending=True)  # the kept points first
        usable = keep.sum()
    if count < size:
        order = torch.cat((order, order.new_zeros(size - count)))
    order = order[:size]
    slots = torch.arange(size, device=x.device)
    valid = slots < usable
    cands = pool[:, order]  # [H, 2C, D]
    sims = torch.einsum("hcd,hkd->hck", cands, cands)
    earlier = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1) & valid
    repeat = ~valid | ((sims > SAME_DIRECTION) & earlier).any(dim=-1)  # [H, 2C]
    # per head, the candidates that repeat nothing first, in drawn order
    first = (repeat.long() * size + slots).argsort(dim=-1)[:, :num_clusters]
    means = cands.gather(1, first[..., None].expand(-1, -1, d))
    missing = repeat.gather(1, first)
    if fallback is None:
        fallback = torch.randn(h, num_clusters, d, generator=generator, device="cpu").to(x.device)
    fallback = F.normalize(fallback.to(x.dtype), dim=-1)
    return torch.where(missing[..., None], fallback, means), missing


def commitment_loss(x: Tensor, means: Tensor, buckets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared distance of points x [B, H, N, D] to their centroids (a scalar).

    Gradients reach x only; the centroids move by :func:`lloyd_step` and :func:`ema_`.
    """
    heads = torch.arange(means.shape[0], device=x.device)[:, None]
    m = means.detach().to(x.dtype)
    # |x - m|^2 = |x|^2 - 2 x.m + |m|^2: dot products instead of [B, H, N, D] differences
    routed = m[heads, buckets]  # [B, H, N, D]
    sq_norms = (m * m).sum(dim=-1)[heads, buckets]  # [B, H, N]
    err = (torch.linalg.vecdot(x, x) - 2 * torch.linalg.vecdot(x, routed) + sq_norms) / x.shape[-1]
    w = _point_weights(weights, x)
    if w is None:
        return err.mean()
    return (err * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def ema_(moving: Tensor, new: Tensor, decay: float) -> Tensor:
    """In place ``moving = decay * moving + (1 - decay) * new``; returns ``moving``."""
    return moving.mul_(decay).add_(new.to(moving.dtype), alpha=1.0 - decay)


class Kmeans(nn.Module):
    """Spherical k-means over H heads with C centroids of width D (``means`` [H, C, D])."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_clusters: int,
        ema_decay: float = 0.999,
        commitment: float = 1e-4,
    ) -> None:
        super().__init__()
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("num_clusters", num_clusters)):
            positive_int(name, value)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"kmeans_ema_decay must lie in [0, 1], got {ema_decay!r}")
        if commitment < 0:
            raise ValueError(f"commitment_factor must be >= 0, got {commitment!r}")
        self.ema_decay = ema_decay
        self.commitment = commitment
        self.register_buffer("means", F.normalize(torch.randn(num_heads, num_clusters, head_dim), dim=-1))
        self.register_buffer("initted", torch.tensor(False))
        # ``initted`` on the host, so that a compiled graph never reads the buffer (kept in
        # step by :meth:`init` and by loading a state dict)
        self._initted = False
        self._pending: Tensor | None = None
        self._pending_count = 0

    @property
    def num_clusters(self) -> int:
        return self.means.shape[1]

    def _apply(self, fn, recurse: bool = True):
        # The centroids stay float32 when the model goes to half precision (model.to(bfloat16)):
        # an EMA step moves them by 1 - decay (0.001) of the way, below bfloat16's resolution
        # near 1, so bfloat16 centroids barely moved. Every use casts them to the points' dtype.
        kept = self.means
        out = super()._apply(fn, recurse)
        if self.means.dtype in (torch.float16, torch.bfloat16):
            self.means = kept.to(self.means.device, torch.float32)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)

    @torch.no_grad()
    def init(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Initialise the centroids from the points x [B, H, N, D] (once; in training only, and
        only from a call with C distinct points: see the module docstring)."""
        if not self._initted and not torch.compiler.is_compiling():
            self._initted = bool(self.initted)  # the buffer may have been set in place
        if self._initted or not self.training or x.shape[0] * x.shape[2] < self.num_clusters:
            return
        x = x.float()
        # The draw takes its numbers from a fork of the CPU generator: a recomputation for
        # backward (recompute_attention, reversible) finds the centroids set and draws nothing,
        # so numbers taken from the global stream would shift its replayed dropout masks off
        # the forward's. (A compiled graph draws from the stream.)
        forked = nullcontext() if torch.compiler.is_compiling() else torch.random.fork_rng(devices=[])
        with forked:
            means, missing = draw_centroids(x, self.num_clusters, weights, None, self.means)
        # a compiled graph cannot wait for this answer: there the missing centroids keep the
        # constructor's directions and the centroids count as initialised
        if not torch.compiler.is_compiling() and bool(missing.any()):
            return
        for _ in range(KMEANS_INIT_ITERS):
            means = lloyd_step(x, means, weights=weights)
        self.means.copy_(means)
        self.initted.fill_(True)
        self._initted = True
        self._pending, self._pending_count = None, 0

    def forward(
        self,
        x: Tensor,
        *,
        paired: bool = False,
        weights: Tensor | None = None,
        update_means: bool = False,
        normalized: bool = False,
        need_similarities: bool = True,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """x [B, H, N, D] (normalised inside) -> (similarities [B, H, N, C] without gradient,
        nearest centroid [B, H, N], commitment loss scaled by ``commitment``).
        ``need_similarities=False``: None instead of the similarities, which are then never
        held whole (:func:`nearest_in_pieces`).

        ``paired``: x holds N / 2 queries then their N / 2 keys, and each (query, key) pair of a
        token shares one cluster, the nearest to both (k-means on the pairs). ``weights``
        [B, N] marks the points that count (padding excluded). ``update_means`` accumulates a
        Lloyd step for the next :meth:`update`. ``normalized``: x is already L2-normalised.
        """
        if not normalized:
            x = F.normalize(x, dim=-1)
        self.init(x, weights)
        with torch.no_grad():
            dists = similarities(x, self.means) if need_similarities else None
            if dists is None:
                buckets = nearest_in_pieces(x, self.means, paired=paired)
            elif paired:
                n = x.shape[2] // 2
                token = argmax_last(dists[:, :, :n] + dists[:, :, n:])
                buckets = torch.cat((token, token), dim=-1)
            else:
                buckets = argmax_last(dists)
        loss = commitment_loss(x, self.means, buckets, weights) * self.commitment
        if update_means:
            with torch.no_grad():
                fresh = lloyd_step(x.float(), self.means, buckets, weights)
                self._pending_count += 1
                if self._pending is None:
                    self._pending = fresh
                else:
                    self._pending += (fresh - self._pending) / self._pending_count
        return dists, buckets, loss

    @torch.no_grad()
    def update(self, new_means: Tensor | None = None) -> bool:
        """Move the centroids toward ``new_means`` (default: the Lloyd steps accumulated since
        the last update) by the EMA; returns False when there was nothing to apply."""
        new_means = self._pending if new_means is None else new_means
        if new_means is None:
            return False
        ema_(self.means, new_means, self.ema_decay)
        self._pending, self._pending_count = None, 0
        return True
