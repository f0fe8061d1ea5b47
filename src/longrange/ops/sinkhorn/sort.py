"""Sort scores: how well each key bucket suits each query bucket (the sort nets' maths).

- Non-causal (:func:`attention_sort_scores`): the mean query of a bucket (or of the whole
  sequence, for SortCut) against the mean key of each key bucket, scaled by D ** -0.5.
- Causal (:func:`causal_sort_scores`): a query bucket is summarised by the running mean of
  the queries up to its *first* position, a key bucket by the sum over its positions of the
  running mean of the keys; ``n_null`` null columns (score 0) come first, and a query bucket
  may only pick null columns or key buckets strictly before it. Every quantity a bucket's
  choice uses therefore lies at or before the bucket's first position.

Padding (``mask``, True = real token) never enters a summary: means and running means are
taken over real tokens only, and a key bucket without a real token is not a valid choice.

Dimensions: B batch, H heads, N positions, U query buckets of S, V key buckets of T,
D head width, C candidate columns.
"""

from __future__ import annotations

import torch
from torch import Tensor


def head_mask(mask: Tensor | None) -> Tensor | None:
    """A [B, N] or [B, H, N] mask as [B, 1 or H, N]."""
    if mask is None:
        return None
    return mask[:, None] if mask.dim() == 2 else mask


def bucket_sums(x: Tensor, bucket_size: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """x [B, H, N, D] -> (sums over each bucket's real positions [B, H, U, D],
    real-position counts [B, 1 or H, U] or None without a mask)."""
    b, h, n, d = x.shape
    m = head_mask(mask)
    if m is None:
        return x.reshape(b, h, n // bucket_size, bucket_size, d).sum(dim=3), None
    xm = x * m[..., None].to(x.dtype)
    sums = xm.reshape(b, h, n // bucket_size, bucket_size, d).sum(dim=3)
    counts = m.reshape(m.shape[0], m.shape[1], n // bucket_size, bucket_size).sum(dim=-1)
    return sums, counts


def bucket_means(x: Tensor, bucket_size: int, mask: Tensor | None = None) -> Tensor:
    """Mean over each bucket's real positions: [B, H, N, D] -> [B, H, U, D] (0 if none)."""
    sums, counts = bucket_sums(x, bucket_size, mask)
    if counts is None:
        return sums / bucket_size
    return sums / counts.clamp_min(1)[..., None].to(sums.dtype)


def cumulative_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Running mean over the real positions up to each position: [B, H, N, D] -> same."""
    n = x.shape[2]
    m = head_mask(mask)
    if m is None:
        count = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
        return x.cumsum(dim=2) / count[:, None]
    mf = m.to(x.dtype)
    count = mf.cumsum(dim=-1).clamp_min(1)
    return (x * mf[..., None]).cumsum(dim=2) / count[..., None]


def attention_sort_scores(
    q: Tensor,
    k: Tensor,
    *,
    bucket_size: int,
    kv_bucket_size: int,
    q_mask: Tensor | None = None,
    kv_mask: Tensor | None = None,
    whole_query: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """q [B, H, N, D], k [B, H, M, D] -> (scores [B, H, U, V] (U = 1 with ``whole_query``),
    valid [B, 1 or H, 1, V] or None): bucket-mean queries against bucket-mean keys."""
    d = q.shape[-1]
    sq = bucket_means(q, q.shape[2] if whole_query else bucket_size, q_mask)
    sk = bucket_means(k, kv_bucket_size, kv_mask)
    scores = torch.einsum("bhud,bhvd->bhuv", sq, sk) * d**-0.5
    return scores, key_bucket_valid(kv_mask, kv_bucket_size)


def key_bucket_valid(mask: Tensor | None, bucket_size: int) -> Tensor | None:
    """[B, 1 or H, 1, V]: whether each key bucket holds a real position (None without a mask)."""
    m = head_mask(mask)
    if m is None:
        return None
    return m.reshape(m.shape[0], m.shape[1], -1, bucket_size).any(dim=-1)[:, :, None, :]


def _exclusive_bucket_prefix(xb: Tensor) -> Tensor:
    """[B, H, U, S, D] -> sum of everything in the buckets before each bucket [B, H, U, D]."""
    sums = xb.sum(dim=3)
    # exclusive by construction (not cumsum - own), so no bucket depends on its own values
    return torch.cat([torch.zeros_like(sums[:, :, :1]), sums[:, :, :-1].cumsum(dim=2)], dim=2)


def causal_bucket_summaries(
    x: Tensor, bucket_size: int, mask: Tensor | None = None, *, with_bucket_sums: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Running means of x [B, H, N, D] summarised per bucket without an [N, D] running sum:
    (the running mean at each bucket's first position [B, H, U, D], and the sum over each
    bucket of the running means [B, H, U, D] or None).

    The bucket sum of running means sum_t P_t / n_t (P_t the prefix sum, n_t the count of
    real positions up to t) splits into (sum of the earlier buckets) * sum_t 1 / n_t plus
    sum_r x_r * h_r, where h_r = sum over t >= r in the bucket of 1 / n_t: a weighted
    reduction, O(N * D) reads and no [N, D] intermediate.
    """
    b, h, n, d = x.shape
    s = bucket_size
    u = n // s
    m = head_mask(mask)
    if x.dtype in (torch.float16, torch.bfloat16):
        # counts and long sums need more mantissa than half precision has
        first, sums = causal_bucket_summaries(x.float(), bucket_size, mask, with_bucket_sums=with_bucket_sums)
        return first.to(x.dtype), None if sums is None else sums.to(x.dtype)
    if m is None:
        count = torch.arange(1, n + 1, device=x.device, dtype=x.dtype).reshape(1, 1, u, s)
        xb = x.reshape(b, h, u, s, d)
    else:
        mf = m.to(x.dtype)
        count = mf.cumsum(dim=-1).clamp_min(1).reshape(m.shape[0], m.shape[1], u, s)
        xb = (x * mf[..., None]).reshape(b, h, u, s, d)
    before = _exclusive_bucket_prefix(xb)
    first = (before + xb[:, :, :, 0]) / count[..., 0, None]
    if not with_bucket_sums:
        return first, None
    inv = count.reciprocal()  # [1 or B, 1 or H, U, S]
    tail = inv.flip(-1).cumsum(-1).flip(-1)  # h_r
    sums = before * inv.sum(-1)[..., None] + torch.einsum("bhusd,bhus->bhud", xb, tail.expand(b, h, u, s))
    return first, sums


def causal_query_summaries(q: Tensor, bucket_size: int, mask: Tensor | None = None) -> Tensor:
    """The running mean of the queries at each bucket's first position: [B, H, U, D]."""
    return causal_bucket_summaries(q, bucket_size, mask, with_bucket_sums=False)[0]


def causal_candidates_valid(
    n_buckets: int, n_null: int, *, device: torch.device, has_real: Tensor | None = None
) -> Tensor:
    """[U, n_null + U] (or [B, H, U, n_null + U] with ``has_real`` [B, H, 1, U]): query bucket u
    may pick the null columns and the key buckets j < u (that hold a real position)."""
    u = torch.arange(n_buckets, device=device)
    earlier = u[None, :] < u[:, None]  # [U, U]: column bucket j before row bucket u
    nulls = torch.ones(n_buckets, n_null, dtype=torch.bool, device=device)
    if has_real is None:
        return torch.cat([nulls, earlier], dim=-1)
    real = earlier & has_real
    return torch.cat([nulls.expand(*real.shape[:-1], n_null), real], dim=-1)


def causal_sort_scores(
    q: Tensor, k: Tensor, *, bucket_size: int, n_null: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """q, k [B, H, N, D] -> (scores [B, H, U, n_null + U], valid, broadcastable to the scores).

    Null columns score 0; column ``n_null + j`` scores query bucket u against key bucket j.
    """
    d = q.shape[-1]
    n_buckets = q.shape[2] // bucket_size
    sq = causal_query_summaries(q, bucket_size, mask)
    sk = causal_bucket_summaries(k, bucket_size, mask)[1]
    real = torch.einsum("bhud,bhvd->bhuv", sq, sk) * d**-0.5
    scores = torch.cat([real.new_zeros(*real.shape[:-1], n_null), real], dim=-1)
    valid = causal_candidates_valid(
        n_buckets, n_null, device=q.device, has_real=key_bucket_valid(mask, bucket_size)
    )
    return scores, valid
