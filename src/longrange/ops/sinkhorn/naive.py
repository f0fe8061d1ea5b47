"""Reference Sinkhorn bucket attention: the reordering as a dense matrix, explicit softmax.

The sorted buckets are ``reorder @ key_buckets`` (and the same matrix on the value buckets),
the scores an explicit [S, keys] matrix per query bucket, masked and soft-maxed. The fast
path (:mod:`bucketed`) must equal this forward and backward.

Conventions shared with the fast path:
- padded keys and values (``kv_mask`` / ``mask`` False) are zeroed before any reordering, so
  a soft mixture never carries padded content, and a sorted key position is masked when the
  same position of the bucket the row draws most from (its argmax) is padding;
- padded queries are computed like real ones (their outputs are not meant to be used); a
  query with no key left gets zeros.

Dimensions: B batch, H heads, N queries in U buckets of S, M keys in V buckets of T, R sorted
rows, K sorted buckets per query bucket, P null buckets, D head width, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.sinkhorn.sort import head_mask


def _softmax_rows(scores: Tensor) -> Tensor:
    """Softmax over the last dim; rows that are all -inf give zeros."""
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    attn = scores.masked_fill(empty, 0.0).softmax(dim=-1)
    return attn.masked_fill(empty, 0.0)


def _bucket_keep(mask: Tensor, heads: int, bucket_size: int) -> Tensor:
    m = head_mask(mask)
    return m.expand(m.shape[0], heads, m.shape[-1]).reshape(m.shape[0], heads, -1, bucket_size)


def sinkhorn_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bucket_size: int,
    kv_bucket_size: int,
    reorder: Tensor,
    row_index: Tensor,
    include_own: bool,
    kv_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Non-causal bucket attention.

    q [B, H, N, D], k [B, H, M, D], v [B, H, M, E]; reorder [B, H, R, V]; row_index [U, K]:
    the sorted rows each query bucket attends to; include_own: also the key bucket with the
    query bucket's index (needs U == V). kv_mask [B, M] or [B, H, M]. Returns [B, H, N, E].
    """
    b, h, n, d = q.shape
    u, v_count = n // bucket_size, k.shape[2] // kv_bucket_size
    qb = q.reshape(b, h, u, bucket_size, d)
    kb = k.reshape(b, h, v_count, kv_bucket_size, d)
    vb = v.reshape(b, h, v_count, kv_bucket_size, v.shape[-1])
    keep = None
    if kv_mask is not None:
        keep = _bucket_keep(kv_mask, h, kv_bucket_size)
        kb, vb = kb * keep[..., None], vb * keep[..., None]
    sorted_k = torch.einsum("bhrv,bhvtd->bhrtd", reorder, kb)[:, :, row_index].flatten(3, 4)
    sorted_v = torch.einsum("bhrv,bhvtd->bhrtd", reorder, vb)[:, :, row_index].flatten(3, 4)
    keys, values = sorted_k, sorted_v
    if include_own:
        keys, values = torch.cat([keys, kb], dim=3), torch.cat([values, vb], dim=3)
    scores = torch.einsum("bhusd,bhumd->bhusm", qb, keys) * (d**-0.5 if scale is None else scale)
    if keep is not None:
        src = reorder.argmax(dim=-1)[:, :, row_index]  # [B, H, U, K]
        kk = keep.gather(2, src.reshape(b, h, -1, 1).expand(-1, -1, -1, kv_bucket_size))
        kk = kk.reshape(b, h, u, -1)
        if include_own:
            kk = torch.cat([kk, keep], dim=-1)
        scores = scores.masked_fill(~kk[:, :, :, None, :], float("-inf"))
    out = torch.einsum("bhusm,bhume->bhuse", _softmax_rows(scores), values)
    return out.reshape(b, h, n, v.shape[-1])


def causal_sinkhorn_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    null_k: Tensor,
    null_v: Tensor,
    *,
    bucket_size: int,
    reorder: Tensor,
    wrap_from: int,
    mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal bucket attention over P null buckets, the sorted earlier buckets and the query's
    own bucket (keys at or before the query).

    q, k [B, H, N, D], v [B, H, N, E]; null_k [H, D], null_v [H, E]; reorder
    [B, H, U * P, P + U] (row ``u * P + i``: the i-th sorted bucket of query bucket u; column
    c < P: a null bucket, column P + j: key bucket j). Heads ``h >= wrap_from`` hold a sequence
    rotated left by S - 1, so their last bucket wraps: its row 0 is the last position and sees
    the sorted buckets and itself; rows 1.. are positions 0 .. S - 2 and see only the own keys
    from row 1 up to themselves. mask [B, N] or [B, H, N] (in the same rotated order).
    """
    b, h, n, d = q.shape
    s = bucket_size
    u = n // s
    p = reorder.shape[-1] - u
    qb = q.reshape(b, h, u, s, d)
    kb = k.reshape(b, h, u, s, d)
    vb = v.reshape(b, h, u, s, v.shape[-1])
    keep = None
    if mask is not None:
        keep = _bucket_keep(mask, h, s)
        kb, vb = kb * keep[..., None], vb * keep[..., None]
    null_kb = null_k[None, :, None, None, :].expand(b, h, p, s, d)
    null_vb = null_v[None, :, None, None, :].expand(b, h, p, s, v.shape[-1])
    sorted_k = torch.einsum("bhrc,bhctd->bhrtd", reorder, torch.cat([null_kb, kb], dim=2))
    sorted_v = torch.einsum("bhrc,bhctd->bhrtd", reorder, torch.cat([null_vb, vb], dim=2))
    keys = torch.cat([sorted_k.reshape(b, h, u, p * s, d), kb], dim=3)
    values = torch.cat([sorted_v.reshape(b, h, u, p * s, -1), vb], dim=3)
    scores = torch.einsum("bhusd,bhumd->bhusm", qb, keys) * (d**-0.5 if scale is None else scale)

    rows = torch.arange(s, device=q.device)
    own = rows[None, :] <= rows[:, None]  # [S, S]
    allowed = torch.cat([torch.ones(s, p * s, dtype=torch.bool, device=q.device), own], dim=-1)
    allowed = allowed.expand(h, u, s, (p + 1) * s).clone()
    wrapped = allowed[wrap_from:, -1]
    wrapped[:, 1:, : p * s + 1] = False
    allowed[wrap_from:, -1] = wrapped
    scores = scores.masked_fill(~allowed, float("-inf"))
    if keep is not None:
        ext = torch.cat([keep.new_ones(b, h, p, s), keep], dim=2)
        src = reorder.argmax(dim=-1)  # [B, H, U * P]
        kk = ext.gather(2, src[..., None].expand(-1, -1, -1, s)).reshape(b, h, u, p * s)
        kk = torch.cat([kk, keep], dim=-1)
        scores = scores.masked_fill(~kk[:, :, :, None, :], float("-inf"))
    out = torch.einsum("bhusm,bhume->bhuse", _softmax_rows(scores), values)
    return out.reshape(b, h, n, v.shape[-1])
