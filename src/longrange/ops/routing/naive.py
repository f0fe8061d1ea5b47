"""Reference routed attention: dense attention with a cluster-membership mask.

Each function builds the full [N, M] score matrix, masks it with the routing rule, appends the
per-cluster memory keys, and normalises; the fast files must agree with these.

- :func:`causal_routed_attention_naive`: query i sees the keys of its own cluster at positions
  <= i, only the ``window_size`` most recent of them, plus its cluster's memory keys.
- :func:`balanced_routed_attention_naive`: each cluster c attends among the queries and keys it
  took (index lists); a query's output is the mean over the clusters that took it.
- :func:`assigned_routed_attention_naive`: query i (assigned to one cluster) sees the keys that
  its cluster took, plus the cluster's memory keys.

Shared rules: ``mask`` (True = real token) removes keys, and padded queries output zeros;
``shared_qk`` hides a query's own key unless no other key (memory included) is left; a query
with no key at all outputs zeros.

Dimensions: B batch, H heads, N queries, M keys, D head width, E value width, C clusters,
K memory keys per cluster, W window.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _mem_per_query(mem: Tensor | None, clusters: Tensor) -> Tensor | None:
    """mem [H, C, K, F] gathered for clusters [B, H, N] -> [B, H, N, K, F]."""
    if mem is None or mem.shape[2] == 0:
        return None
    heads = torch.arange(mem.shape[0], device=clusters.device)[:, None]
    return mem[heads, clusters.clamp(0, mem.shape[1] - 1)]


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    mem_k: Tensor | None,
    mem_v: Tensor | None,
    self_key: Tensor | None,
    scale: float | None,
) -> Tensor:
    """Dense softmax over [main keys ; per-query memory keys] in float32.

    q [B, H, N, D], k [B, H, M, D], v [B, H, M, E], keep [B, H, N, M]; mem_k [B, H, N, K, D] and
    mem_v [B, H, N, K, E] (or None); self_key [B, H, N, M] marks each query's own key (or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(work)
    scores = torch.einsum("bhnd,bhmd->bhnm", qf, k.to(work)) * scale
    if mem_k is not None:
        mem_scores = torch.einsum("bhnd,bhnkd->bhnk", qf, mem_k.to(work)) * scale
        scores = torch.cat((mem_scores, scores), dim=-1)
        keep = torch.cat((keep.new_ones(*keep.shape[:-1], mem_k.shape[-2]), keep), dim=-1)
        if self_key is not None:
            self_key = torch.cat((self_key.new_zeros((*keep.shape[:-1], mem_k.shape[-2])), self_key), -1)
    if self_key is not None:
        others = (keep & ~self_key).any(dim=-1, keepdim=True)
        keep = keep & ~(self_key & others)
    any_key = keep.any(dim=-1, keepdim=True)
    weights = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_key, 0.0).softmax(dim=-1)
    weights = weights * any_key
    if mem_v is not None:
        n_mem = mem_v.shape[-2]
        out = torch.einsum("bhnk,bhnke->bhne", weights[..., :n_mem], mem_v.to(work))
        out = out + torch.einsum("bhnm,bhme->bhne", weights[..., n_mem:], v.to(work))
    else:
        out = torch.einsum("bhnm,bhme->bhne", weights, v.to(work))
    return out.to(q.dtype)


def causal_routed_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    clusters: Tensor,
    *,
    window_size: int,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mask: Tensor | None = None,
    shared_qk: bool = False,
    scale: float | None = None,
) -> Tensor:
    """q, k: [B, H, N, D], v: [B, H, N, E]; clusters [B, H, N] (one cluster per token);
    mem_k [H, C, K, D], mem_v [H, C, K, E]; mask [B, N]. Returns [B, H, N, E]."""
    n = q.shape[-2]
    pos = torch.arange(n, device=q.device)
    real = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device) if mask is None else mask
    same = clusters[..., :, None] == clusters[..., None, :]
    candidates = same & (pos[None, :] <= pos[:, None]) & real[:, None, None, :]
    # How many candidate keys lie between key j and query i (both included): the window
    # keeps the W most recent keys of the query's cluster.
    recent = candidates.flip(-1).long().cumsum(-1).flip(-1)
    keep = candidates & (recent <= window_size)
    self_key = (pos[:, None] == pos[None, :]).expand_as(keep) if shared_qk else None
    out = _attend(
        q, k, v, keep, _mem_per_query(mem_k, clusters), _mem_per_query(mem_v, clusters), self_key, scale
    )
    return out.masked_fill(~real[:, None, :, None], 0.0)


def _members(index: Tensor, length: int) -> Tensor:
    """index [B, H, C, W] (positions taken by each cluster) -> membership [B, H, C, length]."""
    out = torch.zeros(*index.shape[:-1], length, dtype=torch.bool, device=index.device)
    return out.scatter(-1, index, True)


def balanced_routed_attention_naive(
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
) -> Tensor:
    """q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E]; q_index [B, H, C, Wq] and k_index
    [B, H, C, Wk] the positions each cluster took; q_mask [B, N], k_mask [B, M]; causal keeps
    keys at positions <= the query's. Returns [B, H, N, E]."""
    b, h, n, _ = q.shape
    m = k.shape[-2]
    q_in, k_in = _members(q_index, n), _members(k_index, m)
    allowed = torch.ones(b, 1, n, m, dtype=torch.bool, device=q.device)
    if q_mask is not None:
        allowed = allowed & q_mask[:, None, :, None]
    if k_mask is not None:
        allowed = allowed & k_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
    self_key = torch.eye(n, m, dtype=torch.bool, device=q.device).expand(b, h, n, m) if shared_qk else None
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    total = torch.zeros(b, h, n, v.shape[-1], device=q.device, dtype=work)
    count = torch.zeros(b, h, n, 1, device=q.device, dtype=work)
    if mem_k is not None and mem_k.shape[2] == 0:
        mem_k = mem_v = None
    for c in range(q_index.shape[2]):
        keep = allowed & k_in[:, :, c, None, :]
        mem = None if mem_k is None else mem_k[:, c, None].expand(b, h, n, -1, -1)
        mem_vals = None if mem_v is None else mem_v[:, c, None].expand(b, h, n, -1, -1)
        out = _attend(q, k, v, keep, mem, mem_vals, self_key, scale).to(total.dtype)
        took = q_in[:, :, c, :, None].to(work)
        total = total + out * took
        count = count + took
    out = (total / count.clamp_min(1.0)).to(q.dtype)
    return out if q_mask is None else out.masked_fill(~q_mask[:, None, :, None], 0.0)


def assigned_routed_attention_naive(
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
) -> Tensor:
    """q: [B, H, N, D], k: [B, H, M, D], v: [B, H, M, E]; q_clusters [B, H, N]; k_index
    [B, H, C, Wk] the keys each cluster took; q_mask [B, N], k_mask [B, M]. Returns
    [B, H, N, E]."""
    k_in = _members(k_index, k.shape[-2])  # [B, H, C, M]
    keep = k_in.gather(2, q_clusters[..., None].expand(-1, -1, -1, k_in.shape[-1]))
    if k_mask is not None:
        keep = keep & k_mask[:, None, None, :]
    out = _attend(
        q, k, v, keep, _mem_per_query(mem_k, q_clusters), _mem_per_query(mem_v, q_clusters), None, scale
    )
    return out if q_mask is None else out.masked_fill(~q_mask[:, None, :, None], 0.0)
