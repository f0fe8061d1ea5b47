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
rotated left by S - 1 (``layout.rotate_heads``), which moves bucket boundaries by S - 1 for
them; their last bucket wraps around and is recomputed with its own mask (row 0, the last
position, sees the sorted buckets and itself; rows 1.., positions 0 .. S - 2, see their own
keys from row 1 up to themselves).

Dimensions: B batch, H heads, N queries in U buckets of S, M keys in V buckets of T, R sorted
rows, K sorted buckets per query bucket, P null buckets, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.checks import one_dtype
from longrange.ops.dense import dense_attention
from longrange.ops.sinkhorn.layout import gather_weighted
from longrange.ops.sinkhorn.picked import causal_picked_attention, picked_supported
from longrange.ops.sinkhorn.sort import head_mask

CAUSAL_BACKENDS = ("auto", "gathered", "picked")


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


def _bucket_keep(mask: Tensor, heads: int, bucket_size: int) -> Tensor:
    m = head_mask(mask)
    return m.expand(m.shape[0], heads, m.shape[-1]).reshape(m.shape[0], heads, -1, bucket_size)


def _masked_buckets(
    k: Tensor, v: Tensor, mask: Tensor | None, bucket_size: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """k [B, H, N, D], v [B, H, N, E] -> key and value buckets [B*H, N / T, T * D] (and * E) with
    masked positions zeroed, and the keep mask [B*H, N / T, T] (None without a mask)."""
    b, h, n, d = k.shape
    e, t = v.shape[-1], bucket_size
    r, count = b * h, n // bucket_size
    kb, vb = k.reshape(r, count, t * d), v.reshape(r, count, t * e)
    if mask is None:
        return kb, vb, None
    keep = _bucket_keep(mask, h, t).expand(b, h, count, t).reshape(r, count, t)
    kb = (kb.reshape(r, count, t, d) * keep[..., None].to(kb.dtype)).reshape(r, count, t * d)
    vb = (vb.reshape(r, count, t, e) * keep[..., None].to(vb.dtype)).reshape(r, count, t * e)
    return kb, vb, keep


def _check(
    q: Tensor, k: Tensor, v: Tensor, bucket_size: int, kv_bucket_size: int, kv_mask: Tensor | None = None
) -> None:
    for name, size in (("bucket_size", bucket_size), ("kv_bucket_size", kv_bucket_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, H, N, D] tensor, got {tuple(t.shape)}")
    one_dtype(q=q, k=k, v=v, autocast_casts=True)
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be [B, H, M, D] as q {tuple(q.shape)} is, got {tuple(k.shape)}")
    if kv_mask is not None:
        b, h, m = k.shape[:3]
        if kv_mask.dtype != torch.bool or tuple(kv_mask.shape) not in ((b, m), (b, 1, m), (b, h, m)):
            raise ValueError(
                f"kv_mask must be a bool tensor [B, M] = {(b, m)} or [B, 1 or H, M], got "
                f"{kv_mask.dtype} {tuple(kv_mask.shape)}"
            )
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
    _check(q, k, v, bucket_size, kv_bucket_size, kv_mask)
    b, h, n, d = q.shape
    e = v.shape[-1]
    u, v_count, t = n // bucket_size, k.shape[2] // kv_bucket_size, kv_bucket_size
    if include_own and u != v_count:
        raise ValueError(f"include_own needs as many query as key buckets, got {u} and {v_count}")
    r = b * h
    kb, vb, keep = _masked_buckets(k, v, kv_mask, t)
    shared = not include_own and bool((row_index == row_index[:1]).all())
    rows = row_index[:1] if shared else row_index  # [U', K]
    if indices is not None:
        if weights is None or reorder is not None:
            raise ValueError("give either indices with weights, or reorder")
        picks = indices.reshape(r, -1)[:, rows]  # [R, U', K]
        w = weights.reshape(r, -1)[:, rows]
        src_k, src_v, src_keep = kb, vb, keep
    elif reorder is not None:
        # soft reordering: one batched matmul over the buckets, then every row has weight 1
        mix = reorder.reshape(r, -1, v_count).to(kb.dtype)
        src_k, src_v = torch.matmul(mix, kb), torch.matmul(mix, vb)
        picks = rows.expand(r, *rows.shape)
        w = torch.ones(picks.shape, dtype=kb.dtype, device=kb.device)
        src_keep = None
        if keep is not None:
            src_keep = keep.gather(1, mix.argmax(dim=-1)[..., None].expand(-1, -1, t))
    else:
        raise ValueError("give either indices with weights, or reorder")
    own_k, own_v = (kb, vb) if include_own else (None, None)
    keys = gather_weighted(src_k, picks, w, own=own_k)
    values = gather_weighted(src_v, picks, w, own=own_v)
    mask = None
    if keep is not None:
        kk = gather_buckets(src_keep.reshape(b, h, -1, t), picks.reshape(b, h, *picks.shape[1:]))
        kk = kk.reshape(r, picks.shape[1], -1)
        if include_own:
            kk = torch.cat([kk, keep], dim=-1)
        mask = kk[:, :, None, :]

    if shared:
        # SortCut without own buckets: every query sees the same keys, one flat attention.
        out = dense_attention(
            q.reshape(r, 1, n, d),
            keys.reshape(r, 1, -1, d),
            values.reshape(r, 1, -1, e),
            mask=mask,
            scale=scale,
            dropout=dropout,
        )
        return out.reshape(b, h, n, e)
    out = dense_attention(
        q.reshape(r, u, bucket_size, d),
        keys.reshape(r, u, -1, d),
        values.reshape(r, u, -1, e),
        mask=mask,
        scale=scale,
        dropout=dropout,
    )
    return out.reshape(b, h, n, e)


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
    backend: str = "auto",
) -> Tensor:
    """Causal bucket attention; same contract as :func:`naive.causal_sinkhorn_attention_naive`
    with the reordering given as picks: indices, weights [B, H, U, P] (column c < P: a null
    bucket, P + j: key bucket j < u). ``backend``: "gathered" (every bucket's keys and values
    written at once, one SDPA call; any device, masks, dropout), "picked"
    (:mod:`~longrange.ops.sinkhorn.picked`: chunk by chunk with a lean backward on the CPU
    flash kernels; no mask, no dropout) or "auto" (picked where it applies)."""
    if backend not in CAUSAL_BACKENDS:
        raise ValueError(f"backend must be one of {CAUSAL_BACKENDS}, got {backend!r}")
    _check(q, k, v, bucket_size, bucket_size)
    b, h, n, d = q.shape
    s, e = bucket_size, v.shape[-1]
    u, p = n // s, indices.shape[-1]
    r = b * h
    picked_applies = mask is None and dropout == 0 and picked_supported(q, v)
    if backend == "picked" and not picked_applies:
        raise ValueError("the picked backend needs CPU tensors, v as wide as q, no mask and no dropout")
    picks = torch.where(indices < p, -1, indices - p).reshape(r, u, p)  # -1: a null bucket
    w = weights.reshape(r, u, p)
    if backend != "gathered" and picked_applies:
        rows = lambda t: t[None].expand(b, h, t.shape[-1]).reshape(r, -1)  # noqa: E731
        wrapped = None
        if wrap_from < h:
            wrapped = (torch.arange(h, device=q.device) >= wrap_from).expand(b, h).reshape(r)
        out = causal_picked_attention(
            q.reshape(r, u, s, d), k.reshape(r, u, s, d), v.reshape(r, u, s, e),
            rows(null_k.to(q.dtype)), rows(null_v.to(v.dtype)), picks, w,
            scale=d**-0.5 if scale is None else scale, wrapped_rows=wrapped,
        )  # fmt: skip
        return out.reshape(b, h, n, e)
    kb, vb, keep = _masked_buckets(k, v, mask, s)
    null_kb = null_k.to(kb.dtype)[None, :, None, :].expand(b, h, s, d).reshape(r, s * d)
    null_vb = null_v.to(vb.dtype)[None, :, None, :].expand(b, h, s, e).reshape(r, s * e)
    m = (p + 1) * s
    keys = gather_weighted(kb, picks, w, null=null_kb, own=kb).reshape(r, u, m, d)
    values = gather_weighted(vb, picks, w, null=null_vb, own=vb).reshape(r, u, m, e)

    allowed = causal_bucket_mask(s, p, device=q.device)
    full = allowed
    kk = None
    if keep is not None:
        picked_keep = keep.gather(1, picks.clamp_min(0).reshape(r, u * p, 1).expand(-1, -1, s))
        picked_keep = picked_keep.reshape(r, u, p, s) | (picks < 0)[..., None]
        kk = torch.cat([picked_keep.reshape(r, u, p * s), keep], dim=-1)  # [R, U, M]
        full = allowed & kk[:, :, None, :]
    out = dense_attention(q.reshape(r, u, s, d), keys, values, mask=full, scale=scale, dropout=dropout)
    if wrap_from < h:
        wrapped = causal_bucket_mask(s, p, device=q.device, wrapped=True)
        heads = slice(wrap_from, h)
        last_q = q.reshape(b, h, u, s, d)[:, heads, -1]
        last_k = keys.reshape(b, h, u, m, d)[:, heads, -1]
        last_v = values.reshape(b, h, u, m, e)[:, heads, -1]
        if kk is not None:
            wrapped = wrapped & kk.reshape(b, h, u, 1, m)[:, heads, -1]
        last = dense_attention(last_q, last_k, last_v, mask=wrapped, scale=scale, dropout=dropout)
        out = _ReplaceLastBucket.apply(out.reshape(b, h, u, s, e), last, wrap_from)
    return out.reshape(b, h, n, e)


class _ReplaceLastBucket(torch.autograd.Function):
    """out [B, H, U, S, E] with the last bucket of heads ``start``.. replaced by ``last``
    [B, H - start, S, E]; one copy each way."""

    @staticmethod
    def forward(ctx, out: Tensor, last: Tensor, start: int) -> Tensor:
        ctx.start = start
        res = out.clone()
        res[:, start:, -1] = last
        return res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        grad_last = grad[:, ctx.start :, -1].clone()
        grad_out = grad.clone()
        grad_out[:, ctx.start :, -1] = 0
        return grad_out, grad_last, None
