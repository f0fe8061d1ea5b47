"""Strictly causal routed attention in O(N * W): sort by (cluster, position), then blocked
local attention in that order (docs/CAUSALITY.md, "Routing: a cluster per token").

The reference routes causal attention like the non-causal one (each cluster takes its top-W
tokens over the whole sequence), so whether a past token is routed, and which keys it meets,
depends on future tokens. Here every token has one cluster (a function of that token alone)
and a query sees the ``window_size`` most recent keys of its own cluster, itself included:

1. stable order by (cluster, position): a cluster's tokens become one contiguous run in time
   order, so "the W most recent keys of my cluster" is "same cluster and 0 <= sorted distance
   < W". Only tokens of the same cluster lie between two tokens of one cluster, so that
   distance never counts another cluster's (possibly future) tokens;
2. the sorted sequence is cut into blocks of ``block_size`` queries; each block meets the keys
   of its own block and of the ``ceil((W - 1) / block_size)`` blocks before it, with the mask
   (same cluster) & (0 <= distance < W), in one batched SDPA call; never N x N;
3. each query also meets the K memory ("null") keys of its cluster: they are gathered per
   query slot and appended to the block's keys, visible to that slot only;
4. outputs are scattered back to time order.

Padded tokens (``mask`` False) form a cluster of their own, so they never take a real token's
place in a window, and their outputs are zero. :func:`causal_routed_step` is the same rule for
one new token against per-cluster ring buffers of the W most recent keys (decoding).

Dimensions: B batch, H heads, N positions, T padded sorted length, P blocks, Q block size,
S = (L + 1) * Q keys per span (L look-back blocks), C clusters, K memory keys per cluster,
W window, D head width, E value width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.checks import floating_tensors, one_dtype
from longrange.ops.dense import additive_mask
from longrange.ops.routing.order import NO_CLUSTER, default_block_size, sort_by_cluster
from longrange.ops.routing.spans import causal_routed_attention_spans, span_attention_supported

ROUTED_BACKENDS = ("auto", "blocked", "spans")


def check_routing_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mem_k: Tensor | None,
    mem_v: Tensor | None,
    mask: Tensor | None,
    same_length: bool,
) -> None:
    """ValueError / TypeError naming the bad argument (shapes as in the op docstrings)."""
    floating_tensors(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    one_dtype(q=q, k=k, v=v, autocast_casts=False)
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"q [B, H, N, D], k [B, H, M, D], v [B, H, M, E] do not fit: {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if same_length and k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must have the same length, got {q.shape[2]} and {k.shape[2]}")
    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together")
    if mem_k is not None:
        heads = q.shape[1]
        if mem_k.dim() != 4 or mem_k.shape[0] != heads or mem_k.shape[-1] != q.shape[-1]:
            raise ValueError(f"mem_k must be [H={heads}, C, K, D={q.shape[-1]}], got {tuple(mem_k.shape)}")
        if mem_v.shape[:3] != mem_k.shape[:3] or mem_v.shape[-1] != v.shape[-1]:
            raise ValueError(f"mem_v must be [H, C, K, E={v.shape[-1]}], got {tuple(mem_v.shape)}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (q.shape[0], q.shape[2])):
        raise ValueError(
            f"mask must be a bool tensor [B, N] = {(q.shape[0], q.shape[2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def check_routing_options(*, scale: float | None, dropout: float) -> None:
    """ValueError / TypeError for a ``scale`` that is not None or a finite number, or a
    ``dropout`` outside [0, 1)."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def _check_clusters(name: str, clusters: Tensor, shape: tuple[int, ...], num_clusters: int | None) -> None:
    if not isinstance(clusters, Tensor) or clusters.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor of cluster ids")
    if tuple(clusters.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(clusters.shape)}")
    if clusters.numel() and int(clusters.min()) < 0:
        raise ValueError(f"{name} must hold cluster ids >= 0")
    if num_clusters is not None and clusters.numel() and int(clusters.max()) >= num_clusters:
        raise ValueError(f"{name} holds ids >= the {num_clusters} clusters of mem_k")


def causal_routed_attention(
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
    dropout: float = 0.0,
    block_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal routed attention; same contract as
    :func:`longrange.ops.routing.naive.causal_routed_attention_naive`, plus dropout.

    q, k: [B, H, N, D], v: [B, H, N, E]; clusters [B, H, N] long in [0, C); mem_k [H, C, K, D],
    mem_v [H, C, K, E] (K may be 0); mask [B, N] (True = real token). ``block_size`` (default
    :func:`default_block_size`) trades span waste against batch size. ``backend``: "blocked"
    (gathered spans, one SDPA call; any device, dropout), "spans"
    (:func:`~longrange.ops.routing.spans.causal_routed_attention_spans`: strided spans and a
    lean backward on the CPU flash kernels) or "auto" (spans where they apply). Returns
    [B, H, N, E].
    """
    if backend not in ROUTED_BACKENDS:
        raise ValueError(f"backend must be one of {ROUTED_BACKENDS}, got {backend!r}")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    check_routing_inputs(q, k, v, mem_k=mem_k, mem_v=mem_v, mask=mask, same_length=True)
    check_routing_options(scale=scale, dropout=dropout)
    b, h, n, _ = q.shape
    if not torch.compiler.is_compiling():
        _check_clusters("clusters", clusters, (b, h, n), None if mem_k is None else mem_k.shape[1])
    if q.numel() == 0:  # no batch, head or position: v is the empty [B, H, N, E] output
        return v.clone()
    n_mem = 0 if mem_k is None else mem_k.shape[2]
    spans_apply = span_attention_supported(q) and v.shape[-1] == q.shape[-1] and (n_mem > 0 or not shared_qk)
    if backend == "spans" or (backend == "auto" and spans_apply and dropout == 0):
        if not spans_apply or dropout:
            raise ValueError(
                "the spans backend needs CPU tensors, v as wide as q, no dropout, "
                "and a memory key with shared_qk"
            )
        return causal_routed_attention_spans(
            q, k, v, clusters, window_size=window_size, mem_k=mem_k, mem_v=mem_v, mask=mask,
            shared_qk=shared_qk, scale=scale, block_size=block_size,
        )  # fmt: skip
    e = v.shape[-1]
    w = window_size
    block = min(block_size or default_block_size(w), max(n, 1))
    blocks = -(-n // block)
    look_back = min(-(-(w - 1) // block), blocks - 1)
    extra = blocks * block - n

    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    n_mem = 0 if mem_k is None else mem_k.shape[2]
    span = (look_back + 1) * block
    rows_total = b * h * n
    device = q.device

    # Every gather below reads rows of a table [B * H * N rows of q / k / v ; a zero row ;
    # K unit rows for the memory keys], so the sorted order, the block spans and the
    # memory columns each cost one row gather, and their gradients one index_add.
    order, sorted_clusters = sort_by_cluster(clusters, mask)
    sorted_rows = torch.arange(b * h, device=device).view(b, h, 1) * n + order
    front = look_back * block
    ext_rows = F.pad(sorted_rows, (front, extra), value=rows_total)  # [B, H, L * Q + T]
    ext_clusters = F.pad(sorted_clusters.int(), (front, extra), value=NO_CLUSTER)
    span_rows = ext_rows.unfold(2, span, block)  # [B, H, P, S]
    c_spans = ext_clusters.unfold(2, span, block)
    q_rows = ext_rows[..., front:]  # [B, H, T]
    c_sorted = ext_clusters[..., front:]
    if n_mem:
        mem_cols = torch.arange(rows_total + 1, rows_total + 1 + n_mem, device=device)
        span_rows = torch.cat((span_rows, mem_cols.expand(b, h, blocks, n_mem)), dim=-1)

    def table(x: Tensor, width: int) -> Tensor:
        unit = F.pad(torch.eye(n_mem, dtype=x.dtype, device=device), (width, 0))
        return torch.cat(
            (F.pad(x.reshape(rows_total, width), (0, n_mem)), x.new_zeros(1, width + n_mem), unit)
        )

    k_spans = table(k, d).index_select(0, span_rows.reshape(-1)).view(b, h * blocks, -1, d + n_mem)
    v_spans = table(v, e).index_select(0, span_rows.reshape(-1)).view(b, h * blocks, -1, e + n_mem)
    qs = torch.cat((q.reshape(rows_total, d), q.new_zeros(1, d))).index_select(0, q_rows.reshape(-1))
    qs = qs.view(b, h, blocks * block, d)
    if n_mem:
        # Memory keys differ per query (its cluster's), so they ride on K extra feature
        # columns: query i carries its K memory logits q_i . mem_k[c_i] there, and the K
        # unit-vector key columns pick them out. K extra value channels return each memory
        # key's attention weight, which then scales the query's own memory values.
        n_clusters = mem_k.shape[1]
        heads = torch.arange(h, device=device).view(1, h, 1, 1)
        slot = c_sorted.long().clamp(0, n_clusters - 1)[..., None] + heads * n_clusters
        slot = (slot * n_mem + torch.arange(n_mem, device=device)).view(-1)  # rows of [H * C * K, *]
        mem_rows = mem_k.to(q.dtype).reshape(-1, d).index_select(0, slot).view(b, h, -1, n_mem, d)
        qs = torch.cat((qs, (qs[..., None, :] * mem_rows).sum(-1)), dim=-1)  # [B, H, T, D + K]

    rows = torch.arange(block, device=device)[:, None]
    cols = torch.arange(span, device=device)[None, :]
    distance = front + rows - cols
    band = (distance >= 0) & (distance < w)  # [Q, S]
    if shared_qk and n_mem:
        band = band & (distance != 0)  # the memory key is always there: never alone
    keep = band & (c_sorted.view(b, h, blocks, block, 1) == c_spans[..., None, :])  # [B, H, P, Q, S]
    any_key = None
    if n_mem:
        keep = F.pad(keep, (0, n_mem), value=True)
    else:
        if shared_qk:
            is_self = distance == 0
            others = (keep & ~is_self).any(dim=-1, keepdim=True)
            keep = keep & ~(is_self & others)
        any_key = keep.any(dim=-1, keepdim=True)
        keep = keep | ~any_key  # SDPA gives NaN on a row with no key: open it, zero it below
    bias = additive_mask(keep, q.dtype)

    out = F.scaled_dot_product_attention(
        qs.view(b, h * blocks, block, -1),
        k_spans,
        v_spans,
        attn_mask=bias.view(b, h * blocks, block, -1),
        dropout_p=dropout,
        scale=scale,
    ).view(b, h, blocks * block, -1)
    if any_key is not None:
        out = out.masked_fill(~any_key.view(b, h, blocks * block, 1), 0.0)
    if n_mem:
        main, weights = out.split((e, n_mem), dim=-1)
        mem_rows = mem_v.to(v.dtype).reshape(-1, e).index_select(0, slot).view(b, h, -1, n_mem, e)
        out = main + (weights[..., None] * mem_rows).sum(-2)
    # back to time order: token i sits at sorted place inverse[i]
    inverse = torch.empty_like(order).scatter_(2, order, torch.arange(n, device=device).expand(b, h, n))
    back = (torch.arange(b * h, device=device).view(b, h, 1) * (blocks * block) + inverse).view(-1)
    out = out.reshape(-1, e).index_select(0, back).view(b, h, n, e)
    if mask is not None:
        out = out.masked_fill(~mask[:, None, :, None], 0.0)
    return out


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, N, F] rows picked by index [B, H, M] -> [B, H, M, F]."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def ring_buffers(
    k: Tensor, v: Tensor, clusters: Tensor, *, num_clusters: int, window_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The decoding cache after a prompt: for every cluster the W most recent keys and values.

    k: [B, H, N, D], v: [B, H, N, E], clusters [B, H, N]. Returns (k_buf [B, H, C, W, D],
    v_buf [B, H, C, W, E], counts [B, H, C]); the j-th token of a cluster (counting from 0)
    sits in slot j mod W, so slot (count - 1) mod W holds the newest.
    """
    b, h, n, d = k.shape
    c, w = num_clusters, window_size
    order, sorted_clusters = sort_by_cluster(clusters)
    counts = torch.zeros(b, h, c, dtype=torch.long, device=k.device)
    counts.scatter_add_(2, clusters.long(), torch.ones_like(clusters, dtype=torch.long))
    starts = counts.cumsum(-1) - counts
    rank = torch.arange(n, device=k.device) - starts.gather(2, sorted_clusters)
    recent = rank >= counts.gather(2, sorted_clusters) - w
    flat_slot = (sorted_clusters * w + rank % w).masked_fill(~recent, c * w)  # c * w: discarded
    k_buf = k.new_zeros(b, h, c * w + 1, d)
    v_buf = v.new_zeros(b, h, c * w + 1, v.shape[-1])
    k_buf.scatter_(2, flat_slot[..., None].expand(b, h, n, d), _gather_tokens(k, order))
    v_buf.scatter_(2, flat_slot[..., None].expand(b, h, n, v.shape[-1]), _gather_tokens(v, order))
    return (
        k_buf[:, :, : c * w].view(b, h, c, w, d),
        v_buf[:, :, : c * w].view(b, h, c, w, -1),
        counts,
    )


def push_ring(k_buf: Tensor, v_buf: Tensor, counts: Tensor, k: Tensor, v: Tensor, clusters: Tensor) -> None:
    """Write one new token per row (k [B, H, 1, D], v [B, H, 1, E], clusters [B, H]) into the
    buffers of :func:`ring_buffers`, in place."""
    b, h, _, w, _ = k_buf.shape
    bi = torch.arange(b, device=k.device)[:, None]
    hi = torch.arange(h, device=k.device)[None, :]
    slot = counts[bi, hi, clusters] % w
    k_buf[bi, hi, clusters, slot] = k[:, :, 0]
    v_buf[bi, hi, clusters, slot] = v[:, :, 0]
    counts[bi, hi, clusters] += 1


def causal_routed_step(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    counts: Tensor,
    clusters: Tensor,
    *,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    shared_qk: bool = False,
    scale: float | None = None,
) -> Tensor:
    """One new query per row (q [B, H, 1, D], its cluster [B, H]) against its cluster's ring
    buffer, which already holds its own key (:func:`push_ring`). Returns [B, H, 1, E], the row
    :func:`causal_routed_attention` gives that token."""
    b, h, _, w, _ = k_buf.shape
    bi = torch.arange(b, device=q.device)[:, None]
    hi = torch.arange(h, device=q.device)[None, :]
    keys, values = k_buf[bi, hi, clusters], v_buf[bi, hi, clusters]  # [B, H, W, D]
    count = counts[bi, hi, clusters]  # [B, H]
    slots = torch.arange(w, device=q.device)
    keep = slots < count[..., None]  # [B, H, W]
    is_self = slots == ((count - 1) % w)[..., None]
    if mem_k is not None and mem_k.shape[2]:
        keys = torch.cat((mem_k.to(q.dtype)[hi, clusters], keys), dim=2)
        values = torch.cat((mem_v.to(values.dtype)[hi, clusters], values), dim=2)
        keep = torch.cat((keep.new_ones(b, h, mem_k.shape[2]), keep), dim=-1)
        is_self = torch.cat((is_self.new_zeros(b, h, mem_k.shape[2]), is_self), dim=-1)
    if shared_qk:
        others = (keep & ~is_self).any(dim=-1, keepdim=True)
        keep = keep & ~(is_self & others)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep[:, :, None, :], scale=scale)
