"""Balanced routing (the reference's, for non-causal use) and assigned routing (cross attention
in causal models).

Balanced: every cluster takes the ``Wq`` queries and the ``Wk`` keys most similar to its
centroid (top-k over the sequence), so every cluster does the same work; each cluster's
queries attend its keys (plus its memory keys) in one batched SDPA call, and a query's output
is the mean over the clusters that took it (zero when none did). Which tokens a cluster takes
depends on the whole sequence, so this is for non-causal attention only (the reference also
used it for causal attention, leaking the future; see :mod:`longrange.ops.routing.causal`).

Assigned: the keys are routed as above (top-``Wk`` per cluster over a context that is fully
visible), but every query goes to its own nearest cluster, a function of that query alone.
Queries are grouped by cluster into blocks of ``block_size`` (each cluster's run padded to a
whole number of blocks, so a block holds one cluster) and each block meets its cluster's keys
in one batched SDPA call. A decoder's cross attention stays causal this way.

Dimensions: B batch, H heads, N queries, M keys, C clusters, Wq / Wk tokens per cluster,
K memory keys per cluster, Q block size, P blocks, D head width, E value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.dense import dense_attention_sdpa
from longrange.ops.routing.causal import check_routing_inputs, check_routing_options
from longrange.ops.select import top_k_rows


def _check_index(name: str, index: Tensor, batch_heads: tuple[int, int], length: int) -> None:
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.dim() != 4:
        raise TypeError(f"{name} must be an int64 tensor [B, H, C, W]")
    if tuple(index.shape[:2]) != batch_heads:
        raise ValueError(f"{name} must be [B, H, C, W] with (B, H) = {batch_heads}, got {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= length):
        raise ValueError(f"{name} must hold positions in [0, {length})")


def _check_memory_clusters(mem_k: Tensor | None, clusters: int) -> None:
    if mem_k is not None and mem_k.shape[1] != clusters:
        raise ValueError(
            f"mem_k [H, C, K, D] must have the C = {clusters} clusters of the index, got {mem_k.shape[1]}"
        )


def cluster_topk(dists: Tensor, size: int) -> Tensor:
    """Positions each cluster takes, nearest first: dists [B, H, N, C] -> [B, H, C, size]
    (size <= N); ``top_k_rows`` is ``dists.topk(size, dim=-2)`` without its slow CPU path."""
    if not isinstance(dists, Tensor) or dists.dim() != 4:
        raise ValueError(f"dists must be a [B, H, N, C] tensor, got {getattr(dists, 'shape', dists)!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= dists.shape[2]:
        raise ValueError(f"size must be an int in [0, N = {dists.shape[2]}], got {size!r}")
    return top_k_rows(dists, size).transpose(-1, -2)


def _rows(index: Tensor, n: int) -> Tensor:
    """index [B, H, C, W] of positions in [0, N) -> rows of a flat [B * H * N, F] table, [B*H*C*W]."""
    b, h = index.shape[:2]
    return (torch.arange(b * h, device=index.device).view(b, h, 1, 1) * n + index).reshape(-1)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, N, F] at index [B, H, C, W] -> [B, H, C, W, F]: one ``index_select`` of rows
    (whose backward is an ``index_add``): 2.8x faster forward + backward than ``gather`` with
    the index expanded over F (and ``scatter_add`` back) at [1, 2, 8192, 64]."""
    b, h, n, f = x.shape
    return x.reshape(b * h * n, f).index_select(0, _rows(index, n)).view(*index.shape, f)


def _with_memory(keys: Tensor, mem: Tensor | None) -> Tensor:
    """Prepend mem [H, C, K, F] to keys [B, H, C, W, F]."""
    if mem is None or mem.shape[2] == 0:
        return keys
    return torch.cat((mem.to(keys.dtype).expand(keys.shape[0], -1, -1, -1, -1), keys), dim=3)


def _sdpa_rows(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, scale, dropout) -> Tensor:
    """Attention over [B, H, G, Q, *] groups (the groups as heads of the dense op, which zeroes
    rows without any key); keep [B, H, G, Q, K] or None."""
    b, h, g = q.shape[:3]
    out = dense_attention_sdpa(
        q.flatten(1, 2),
        k.flatten(1, 2),
        v.flatten(1, 2),
        mask=None if keep is None else keep.flatten(1, 2),
        scale=scale,
        dropout=dropout,
    )
    return out.view(b, h, g, q.shape[3], v.shape[-1])


def balanced_routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_index: Tensor,
    k_index: Tensor,
    *,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    q_mask: Tensor | None = None,
    k_mask: Tensor | None = None,
    causal: bool = False,
    shared_qk: bool = False,
    scale: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Same contract as :func:`longrange.ops.routing.naive.balanced_routed_attention_naive`,
    plus dropout. q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E]; q_index [B, H, C, Wq],
    k_index [B, H, C, Wk] (from :func:`cluster_topk`). Returns [B, H, N, E]."""
    check_routing_inputs(q, k, v, mem_k=mem_k, mem_v=mem_v, mask=q_mask, same_length=shared_qk)
    check_routing_options(scale=scale, dropout=dropout)
    b, h, n, _ = q.shape
    _check_index("q_index", q_index, (b, h), n)
    _check_index("k_index", k_index, (b, h), k.shape[2])
    if q_index.shape[2] != k_index.shape[2]:
        raise ValueError(
            f"q_index [B, H, C, Wq] and k_index [B, H, C, Wk] must have the same clusters C, "
            f"got {q_index.shape[2]} and {k_index.shape[2]}"
        )
    _check_memory_clusters(mem_k, k_index.shape[2])
    if k_mask is not None and (k_mask.dtype != torch.bool or tuple(k_mask.shape) != (b, k.shape[2])):
        raise ValueError(f"k_mask must be a bool tensor [B, M] = {(b, k.shape[2])}")
    e = v.shape[-1]
    n_mem = 0 if mem_k is None else mem_k.shape[2]
    qg = _gather(q, q_index)  # [B, H, C, Wq, D]
    kg = _with_memory(_gather(k, k_index), mem_k)
    vg = _with_memory(_gather(v, k_index), mem_v)
    keep = None
    if q_mask is not None or k_mask is not None or causal or shared_qk:
        wq, wk = q_index.shape[-1], k_index.shape[-1]
        keep = torch.ones(b, h, q_index.shape[2], wq, wk, dtype=torch.bool, device=q.device)
        if q_mask is not None:
            keep = keep & _gather(q_mask[:, None, :, None].expand(b, h, n, 1), q_index)
        if k_mask is not None:
            k_kept = _gather(k_mask[:, None, :, None].expand(b, h, -1, 1), k_index)
            keep = keep & k_kept[..., 0][..., None, :]
        if causal:
            keep = keep & (q_index[..., :, None] >= k_index[..., None, :])
        is_self = q_index[..., :, None] == k_index[..., None, :] if shared_qk else None
        if n_mem:
            keep = torch.cat((keep.new_ones(*keep.shape[:-1], n_mem), keep), dim=-1)
            if is_self is not None:
                is_self = torch.cat((is_self.new_zeros(*is_self.shape[:-1], n_mem), is_self), dim=-1)
        if is_self is not None:
            others = (keep & ~is_self).any(dim=-1, keepdim=True)
            keep = keep & ~(is_self & others)
    out = _sdpa_rows(qg, kg, vg, keep, scale, dropout)  # [B, H, C, Wq, E]
    rows = _rows(q_index, n)
    total = q.new_zeros(b * h * n, e).index_add(0, rows, out.reshape(-1, e)).view(b, h, n, e)
    count = q.new_zeros(b * h * n).index_add_(0, rows, q.new_ones(rows.shape)).view(b, h, n)
    out = total / count.clamp_min(1.0)[..., None]
    return out if q_mask is None else out.masked_fill(~q_mask[:, None, :, None], 0.0)


def cluster_keys(
    k: Tensor,
    v: Tensor,
    k_index: Tensor,
    *,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    k_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each cluster's memory keys then the keys it took: k [B, H, M, D], v [B, H, M, E],
    k_index [B, H, C, Wk] -> (keys [B, H, C, K + Wk, D], values [B, H, C, K + Wk, E], which
    are real [B, H, C, K + Wk] or None without ``k_mask``)."""
    kg = _with_memory(_gather(k, k_index), mem_k)
    vg = _with_memory(_gather(v, k_index), mem_v)
    if k_mask is None:
        return kg, vg, None
    b, h = k.shape[:2]
    kept = _gather(k_mask[:, None, :, None].expand(b, h, -1, 1), k_index)[..., 0]  # [B, H, C, Wk]
    return kg, vg, F.pad(kept, (kg.shape[3] - k_index.shape[3], 0), value=True)


def assigned_routed_step(
    q: Tensor,
    clusters: Tensor,
    keys: Tensor,
    values: Tensor,
    kept: Tensor | None = None,
    *,
    scale: float | None = None,
) -> Tensor:
    """One new query per row (q [B, H, 1, D], its cluster [B, H]) against the output of
    :func:`cluster_keys`; returns [B, H, 1, E], the row :func:`assigned_routed_attention`
    gives it."""
    b, h = clusters.shape
    bi = torch.arange(b, device=q.device)[:, None]
    hi = torch.arange(h, device=q.device)[None, :]
    mask = None
    if kept is not None:
        mask = kept[bi, hi, clusters][:, :, None, :]  # [B, H, 1, K + Wk]
    out = F.scaled_dot_product_attention(
        q,
        keys[bi, hi, clusters],
        values[bi, hi, clusters],
        attn_mask=None if mask is None else mask | ~mask.any(-1, keepdim=True),
        scale=scale,
    )
    return out if mask is None else out * mask.any(-1, keepdim=True)[..., 0, None]


def group_by_cluster(clusters: Tensor, num_clusters: int, block: int) -> tuple[Tensor, Tensor, int]:
    """Slots for queries grouped by cluster, each cluster's run padded to whole blocks.

    clusters [B, H, N] -> (slot of each query [B, H, N], cluster of each block [B, H, P], P).
    P = ceil((N + C * (Q - 1)) / Q) bounds the blocks any assignment needs.
    """
    b, h, n = clusters.shape
    device = clusters.device
    counts = torch.zeros(b, h, num_clusters, dtype=torch.long, device=device)
    counts.scatter_add_(2, clusters, torch.ones_like(clusters))
    padded = -(-counts // block) * block
    run_start = padded.cumsum(-1) - padded  # first slot of each cluster's run
    order = (clusters * n + torch.arange(n, device=device)).argsort(dim=-1)
    sorted_clusters = clusters.gather(2, order)
    rank = torch.arange(n, device=device) - (counts.cumsum(-1) - counts).gather(2, sorted_clusters)
    sorted_slot = run_start.gather(2, sorted_clusters) + rank
    slot = torch.empty_like(sorted_slot).scatter_(2, order, sorted_slot)
    blocks = -(-(n + num_clusters * (block - 1)) // block)
    block_cluster = torch.zeros(b, h, blocks, dtype=torch.long, device=device)
    block_cluster.scatter_(2, sorted_slot // block, sorted_clusters)
    return slot, block_cluster, blocks


def assigned_routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_clusters: Tensor,
    k_index: Tensor,
    *,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    q_mask: Tensor | None = None,
    k_mask: Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    block_size: int | None = None,
) -> Tensor:
    """Same contract as :func:`longrange.ops.routing.naive.assigned_routed_attention_naive`,
    plus dropout. q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E]; q_clusters [B, H, N];
    k_index [B, H, C, Wk]. Returns [B, H, N, E]."""
    check_routing_inputs(q, k, v, mem_k=mem_k, mem_v=mem_v, mask=q_mask, same_length=False)
    check_routing_options(scale=scale, dropout=dropout)
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    b, h, n, d = q.shape
    _check_index("k_index", k_index, (b, h), k.shape[2])
    _check_memory_clusters(mem_k, k_index.shape[2])
    if k_mask is not None and (k_mask.dtype != torch.bool or tuple(k_mask.shape) != (b, k.shape[2])):
        raise ValueError(f"k_mask must be a bool tensor [B, M] = {(b, k.shape[2])}")
    if q_clusters.dtype != torch.int64 or tuple(q_clusters.shape) != (b, h, n):
        raise ValueError(f"q_clusters must be an int64 tensor [B, H, N] = {(b, h, n)}")
    e = v.shape[-1]
    c, wk = k_index.shape[2], k_index.shape[3]
    block = max(1, min(block_size or wk, n))
    slot, block_cluster, blocks = group_by_cluster(q_clusters, c, block)
    q_slots = q.new_zeros(b, h, blocks * block, d).scatter(2, slot[..., None].expand(b, h, n, d), q)
    kg, vg, kept = cluster_keys(k, v, k_index, mem_k=mem_k, mem_v=mem_v, k_mask=k_mask)
    per_block = block_cluster[..., None, None]
    k_blocks = kg.gather(2, per_block.expand(-1, -1, -1, kg.shape[3], d))
    v_blocks = vg.gather(2, per_block.expand(-1, -1, -1, vg.shape[3], e))
    keep = None
    if kept is not None:
        keep = kept.gather(2, block_cluster[..., None].expand(-1, -1, -1, kept.shape[-1]))
        keep = keep[..., None, :].expand(-1, -1, -1, block, -1)
    out = _sdpa_rows(q_slots.view(b, h, blocks, block, d), k_blocks, v_blocks, keep, scale, dropout)
    out = out.view(b, h, blocks * block, e).gather(2, slot[..., None].expand(b, h, n, e))
    return out if q_mask is None else out.masked_fill(~q_mask[:, None, :, None], 0.0)
