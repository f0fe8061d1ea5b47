"""Fast Sinkhorn bucket attention: gather the chosen buckets, one batched SDPA call.

Each query bucket attends to K sorted key buckets (and, when the query and key bucketings
match, its own key bucket). Hard choices (top-k indices with their weights) are gathered
with one ``index_select`` and scaled by their weights; soft choices (a Sinkhorn matrix) are
one batched matmul over the buckets. The attention itself is one fused
``scaled_dot_product_attention`` over [B * H, U, S, keys] blocks with a boolean mask only
where one is needed, so memory is O(N * (K + 1) * T), never N x N. The results equal
:mod:`naive` (same conventions: padded keys and values are zeroed before reordering, padded
queries are not special, a query with no key gets zeros).

Causal: P null buckets (a learned key / value, repeated over a bucket) stand in front of the
key buckets; query bucket u draws its P sorted buckets from the nulls and the buckets before
it, and sees its own bucket up to the query. Heads from ``wrap_from`` on hold a sequence
rotated left by S - 1 (:func:`rotate_heads`), which moves bucket boundaries by S - 1 for
them; their last bucket wraps around and is recomputed with its own mask (row 0, the last
position, sees the sorted buckets and itself; rows 1.., positions 0 .. S - 2, see their own
keys from row 1 up to themselves).

Dimensions: B batch, H heads, N queries in U buckets of S, M keys in V buckets of T, R sorted
rows, K sorted buckets per query bucket, P null buckets, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.dense import dense_attention
from longrange.ops.sinkhorn.sort import head_mask


class _RowSelect(torch.autograd.Function):
    """``rows.index_select(0, index)`` whose backward is one ``index_add_`` (autograd's own
    backward scatters with an expanded index, an order of magnitude slower on CPU)."""

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = rows.shape[0]
        return rows.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.n_rows, *grad.shape[1:]).index_add_(0, index, grad.contiguous())
        return out, None


def gather_buckets(buckets: Tensor, index: Tensor) -> Tensor:
    """buckets [B, H, V, ...], index [B, H, *I] (values in [0, V)) -> [B, H, *I, ...]."""
    b, h, v = buckets.shape[:3]
    flat = buckets.reshape(b * h * v, -1)
    offsets = torch.arange(b * h, device=index.device).reshape(b, h, *([1] * (index.dim() - 2))) * v
    flat_index = (index + offsets).reshape(-1)
    picked = _RowSelect.apply(flat, flat_index) if flat.requires_grad else flat.index_select(0, flat_index)
    return picked.reshape(*index.shape, *buckets.shape[3:])


def rotate_heads(x: Tensor, start: int, shift: int, *, dim: int = 2) -> Tensor:
    """Rotate heads ``start:`` (dim 1) of x left by ``shift`` along ``dim``."""
    if start >= x.shape[1] or shift == 0:
        return x
    return torch.cat([x[:, :start], x[:, start:].roll(-shift, dims=dim)], dim=1)


def unrotate_heads(x: Tensor, start: int, shift: int, *, dim: int = 2) -> Tensor:
    """Undo :func:`rotate_heads`."""
    return rotate_heads(x, start, -shift, dim=dim)


def _bucket_keep(mask: Tensor, heads: int, bucket_size: int) -> Tensor:
    m = head_mask(mask)
    return m.expand(m.shape[0], heads, m.shape[-1]).reshape(m.shape[0], heads, -1, bucket_size)


def _check(q: Tensor, k: Tensor, v: Tensor, bucket_size: int, kv_bucket_size: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, H, N, D] tensor, got {tuple(t.shape)}")
    if q.shape[2] % bucket_size:
        raise ValueError(f"query length {q.shape[2]} must be divisible by bucket_size {bucket_size}")
    if k.shape[2] % kv_bucket_size or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"keys / values of length {k.shape[2]} must match and be divisible by kv_bucket_size "
            f"{kv_bucket_size}"
        )


def sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bucket_size: int,
    kv_bucket_size: int,
    row_index: Tensor,
    include_own: bool,
    indices: Tensor | None = None,
    weights: Tensor | None = None,
    reorder: Tensor | None = None,
    kv_mask: Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Non-causal bucket attention; same contract as :func:`naive.sinkhorn_attention_naive`,
    with the sorted rows given either as hard picks (``indices``, ``weights`` [B, H, R]:
    row r is key bucket ``indices[r]`` times ``weights[r]``) or as ``reorder`` [B, H, R, V].
    """
    _check(q, k, v, bucket_size, kv_bucket_size)
    b, h, n, d = q.shape
    u, v_count, t = n // bucket_size, k.shape[2] // kv_bucket_size, kv_bucket_size
    if include_own and u != v_count:
        raise ValueError(f"include_own needs as many query as key buckets, got {u} and {v_count}")
    kb = k.reshape(b, h, v_count, t, d)
    vb = v.reshape(b, h, v_count, t, v.shape[-1])
    keep = None
    if kv_mask is not None:
        keep = _bucket_keep(kv_mask, h, t)
        kb, vb = kb * keep[..., None].to(kb.dtype), vb * keep[..., None].to(vb.dtype)
    if indices is not None:
        if weights is None or reorder is not None:
            raise ValueError("give either indices with weights, or reorder")
        src = indices[:, :, row_index]  # [B, H, U, K]
        w = weights[:, :, row_index][..., None, None]
        sorted_k, sorted_v = gather_buckets(kb, src) * w, gather_buckets(vb, src) * w
    elif reorder is not None:
        rows = reorder.shape[2]
        sorted_k = torch.matmul(reorder, kb.reshape(b, h, v_count, -1)).reshape(b, h, rows, t, d)
        sorted_v = torch.matmul(reorder, vb.reshape(b, h, v_count, -1)).reshape(b, h, rows, t, -1)
        sorted_k, sorted_v = sorted_k[:, :, row_index], sorted_v[:, :, row_index]
        src = reorder.argmax(dim=-1)[:, :, row_index] if keep is not None else None
    else:
        raise ValueError("give either indices with weights, or reorder")
    kk = None
    if keep is not None:
        kk = gather_buckets(keep.expand(b, h, v_count, t), src).flatten(-2)  # [B, H, U, K * T]

    shared = not include_own and bool((row_index == row_index[:1]).all())
    if shared:
        # SortCut without own buckets: every query sees the same keys, one flat attention.
        keys, values = sorted_k[:, :, 0].flatten(2, 3), sorted_v[:, :, 0].flatten(2, 3)
        mask = None if kk is None else kk[:, :, 0, None, :]
        return dense_attention(q, keys, values, mask=mask, scale=scale, dropout=dropout)

    keys, values = sorted_k.flatten(3, 4), sorted_v.flatten(3, 4)
    if include_own:
        keys, values = torch.cat([keys, kb], dim=3), torch.cat([values, vb], dim=3)
        if kk is not None:
            kk = torch.cat([kk, keep], dim=-1)
    mask = None if kk is None else kk.reshape(b * h, u, 1, -1)
    out = dense_attention(
        q.reshape(b * h, u, bucket_size, d),
        keys.reshape(b * h, u, keys.shape[3], d),
        values.reshape(b * h, u, values.shape[3], -1),
        mask=mask,
        scale=scale,
        dropout=dropout,
    )
    return out.reshape(b, h, n, v.shape[-1])


def causal_bucket_mask(
    bucket_size: int, n_sorted: int, *, device: torch.device, wrapped: bool = False
) -> Tensor:
    """[S, P * S + S]: every sorted key, and the own keys at or before the query; ``wrapped``:
    the wrapped last bucket (rows 1.. see only own keys 1 .. themselves)."""
    s = bucket_size
    rows = torch.arange(s, device=device)
    own = rows[None, :] <= rows[:, None]
    sorted_part = torch.ones(s, n_sorted * s, dtype=torch.bool, device=device)
    allowed = torch.cat([sorted_part, own], dim=-1)
    if wrapped:
        allowed[1:, : n_sorted * s + 1] = False
    return allowed


def causal_sinkhorn_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    null_k: Tensor,
    null_v: Tensor,
    *,
    bucket_size: int,
    indices: Tensor,
    weights: Tensor,
    wrap_from: int,
    mask: Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Causal bucket attention; same contract as :func:`naive.causal_sinkhorn_attention_naive`
    with the reordering given as picks: indices, weights [B, H, U, P] (column c < P: a null
    bucket, P + j: key bucket j < u)."""
    _check(q, k, v, bucket_size, bucket_size)
    b, h, n, d = q.shape
    s, e = bucket_size, v.shape[-1]
    u, p = n // s, indices.shape[-1]
    kb = k.reshape(b, h, u, s, d)
    vb = v.reshape(b, h, u, s, e)
    keep = None
    if mask is not None:
        keep = _bucket_keep(mask, h, s)
        kb, vb = kb * keep[..., None].to(kb.dtype), vb * keep[..., None].to(vb.dtype)
    # one null bucket in front serves every null column (they are identical)
    ext_k = torch.cat([null_k[None, :, None, None, :].to(kb.dtype).expand(b, h, 1, s, d), kb], dim=2)
    ext_v = torch.cat([null_v[None, :, None, None, :].to(vb.dtype).expand(b, h, 1, s, e), vb], dim=2)
    slot = (indices - (p - 1)).clamp_min(0)  # [B, H, U, P] into [null, bucket 0, ...]
    w = weights[..., None, None].to(kb.dtype)
    keys = torch.cat([(gather_buckets(ext_k, slot) * w).flatten(3, 4), kb], dim=3)
    values = torch.cat([(gather_buckets(ext_v, slot) * w).flatten(3, 4), vb], dim=3)

    allowed = causal_bucket_mask(s, p, device=q.device)
    full = allowed
    if keep is not None:
        ext_keep = torch.cat([keep.new_ones(b, h, 1, s), keep], dim=2)
        kk = torch.cat([gather_buckets(ext_keep, slot).flatten(-2), keep], dim=-1)  # [B, H, U, M]
        full = allowed & kk[:, :, :, None, :]
    m = (p + 1) * s
    out = dense_attention(
        q.reshape(b * h, u, s, d),
        keys.reshape(b * h, u, m, d),
        values.reshape(b * h, u, m, e),
        mask=full.reshape(b * h, u, s, m) if full.dim() > 2 else full,
        scale=scale,
        dropout=dropout,
    ).reshape(b, h, u, s, e)
    if wrap_from < h:
        wrapped = causal_bucket_mask(s, p, device=q.device, wrapped=True)
        if keep is not None:
            wrapped = wrapped & kk[:, wrap_from:, -1, None, :]
        last = dense_attention(
            q.reshape(b, h, u, s, d)[:, wrap_from:, -1],
            keys[:, wrap_from:, -1],
            values[:, wrap_from:, -1],
            mask=wrapped,
            scale=scale,
            dropout=dropout,
        )
        fixed = torch.cat([out[:, wrap_from:, :-1], last[:, :, None]], dim=2)
        out = torch.cat([out[:, :wrap_from], fixed], dim=1)
    return out.reshape(b, h, n, e)
