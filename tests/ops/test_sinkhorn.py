"""ops/sinkhorn: Sinkhorn balancing, differentiable top-k, sort scores, and the fast bucket
attention equal to the dense-matrix reference, forward and every input gradient."""

from __future__ import annotations

import pytest
import torch

from longrange.ops.sinkhorn import (
    attention_sort_scores,
    causal_sinkhorn_attention,
    causal_sinkhorn_attention_naive,
    causal_sinkhorn_step,
    causal_sort_scores,
    cumulative_mean,
    dense_selection,
    differentiable_topk,
    gumbel_sinkhorn,
    picked_buckets,
    rotate_heads,
    sinkhorn_attention,
    sinkhorn_attention_naive,
    unrotate_heads,
)
from longrange.ops.sinkhorn.layout import (
    gather_weighted,
    merge_heads,
    merge_heads_reference,
    split_heads,
    split_heads_reference,
)
from longrange.testing import assert_close, assert_same_forward_backward


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- balancing ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 12], ids=["n5", "n12"])
def test_sinkhorn_is_doubly_stochastic(n):
    scores = randn(3, n, n, seed=n).exp()
    gen = torch.Generator().manual_seed(0)
    p = gumbel_sinkhorn(scores, n_iters=100, temperature=0.75, noise=True, generator=gen)
    assert torch.all(p >= 0)
    assert (p.sum(dim=-1) - 1).abs().max() < 1e-3
    assert (p.sum(dim=-2) - 1).abs().max() < 1e-3


def test_sinkhorn_approaches_a_permutation_as_temperature_falls():
    scores = randn(4, 8, 8, seed=1).exp()
    sharpness = []
    for temperature in (1.0, 0.3, 0.1, 0.03):
        # low temperatures converge slowly: give them enough iterations
        p = gumbel_sinkhorn(scores, n_iters=3000, temperature=temperature, noise=False)
        assert (p.sum(dim=-1) - 1).abs().max() < 1e-3 and (p.sum(dim=-2) - 1).abs().max() < 1e-3
        sharpness.append(p.max(dim=-1).values.mean().item())
    assert sharpness == sorted(sharpness)
    assert sharpness[-1] > 0.9
    hard = p.round()
    assert torch.equal(hard.sum(dim=-1), torch.ones(4, 8)) and torch.equal(hard.sum(dim=-2), torch.ones(4, 8))


def test_gumbel_noise_only_when_asked():
    scores = randn(2, 6, 6, seed=2).exp()
    a = gumbel_sinkhorn(scores, n_iters=5, temperature=0.75, noise=False)
    b = gumbel_sinkhorn(scores, n_iters=5, temperature=0.75, noise=False)
    c = gumbel_sinkhorn(scores, n_iters=5, temperature=0.75, noise=True)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_differentiable_topk_picks_in_order_with_renormalised_weights():
    scores = randn(2, 3, 7, seed=3)
    valid = torch.ones(7, dtype=torch.bool)
    valid[2] = False
    idx, w = differentiable_topk(scores, 3, temperature=0.5, valid=valid)
    masked = scores.masked_fill(~valid, float("-inf"))
    assert torch.equal(idx, masked.topk(3, dim=-1).indices)
    probs = (masked / 0.5).exp()
    taken = torch.zeros_like(probs)
    for i in range(3):
        expect = probs.gather(-1, idx[..., i : i + 1]) / (probs * (1 - taken)).sum(-1, keepdim=True)
        assert_close(w[..., i : i + 1], expect, 1e-6)
        taken.scatter_(-1, idx[..., i : i + 1], 1.0)
    dense = dense_selection(idx, w, 7)
    assert dense.shape == (2, 9, 7)
    assert_close(dense.sum(-1), w.reshape(2, 9), 1e-7)
    with pytest.raises(ValueError, match="k must lie"):
        differentiable_topk(scores, 8)


def test_cumulative_mean_skips_padding():
    x = randn(1, 1, 6, 3, seed=4)
    mask = torch.tensor([[True, False, True, True, False, True]])
    got = cumulative_mean(x, mask)
    kept = x[0, 0][mask[0]]
    assert_close(got[0, 0, 3], kept[:3].mean(0), 1e-6)
    assert_close(got[0, 0, 4], kept[:3].mean(0), 1e-6)
    assert_close(cumulative_mean(x)[0, 0, 5], x[0, 0].mean(0), 1e-6)


def test_causal_sort_scores_see_only_the_past():
    q, k = randn(1, 2, 24, 4, seed=5), randn(1, 2, 24, 4, seed=6)
    scores, valid = causal_sort_scores(q, k, bucket_size=4, n_null=2)
    assert scores.shape == (1, 2, 6, 8) and valid.shape == (6, 8)
    assert valid[:, :2].all() and not valid[0, 2:].any() and valid[3, 2:5].all() and not valid[3, 5:].any()
    # bucket u's valid scores do not change when positions from u * S + 1 on change
    for u in (1, 3):
        q2, k2 = q.clone(), k.clone()
        q2[:, :, u * 4 + 1 :] += 5
        k2[:, :, u * 4 :] -= 3
        s2, _ = causal_sort_scores(q2, k2, bucket_size=4, n_null=2)
        assert torch.equal(s2[:, :, u][..., valid[u]], scores[:, :, u][..., valid[u]])


# --- bucket attention: fast == naive -----------------------------------------------------------
def _inputs(b, h, n, m, d, seed):
    return randn(b, h, n, d, seed=seed), randn(b, h, m, d, seed=seed + 1), randn(b, h, m, d, seed=seed + 2)


def _padding(b, m, seed, bucket):
    mask = torch.rand(b, m, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, :bucket] = False  # a whole padded bucket
    mask[:, -1] = True
    return mask


# (id, B, H, S, U, T, V, mode, n_top / n_sortcut, padding)
CASES = [
    ("topk1-own", 2, 3, 7, 9, 7, 9, "topk", 1, False),
    ("topk2-own-pad", 2, 2, 7, 9, 7, 9, "topk", 2, True),
    ("topk2-kv-bucket", 1, 2, 5, 7, 10, 3, "topk", 2, False),
    ("sortcut-shared-pad", 2, 2, 5, 7, 10, 3, "sortcut", 2, True),
    ("sortcut-own", 1, 3, 6, 5, 6, 5, "sortcut", 3, False),
    ("sinkhorn-cyclic-pad", 2, 2, 7, 9, 7, 9, "sinkhorn", 2, True),
    ("sinkhorn-sortcut", 1, 2, 4, 8, 4, 8, "sinkhorn-sortcut", 2, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bucket_attention_equals_naive(case):
    _, b, h, s, u, t, v, mode, n, padding = case
    q, k, val = _inputs(b, h, u * s, v * t, 8, seed=len(mode) + u)
    kv_mask = _padding(b, v * t, seed=u, bucket=t) if padding else None
    ar = torch.arange
    if mode in ("topk", "sortcut"):
        scores, valid = attention_sort_scores(
            q, k, bucket_size=s, kv_bucket_size=t, kv_mask=kv_mask, whole_query=mode == "sortcut"
        )
        idx, w = differentiable_topk(scores, n, valid=valid)
        rows = idx.shape[2] * idx.shape[3]
        row_index = ar(n).expand(u, n) if mode == "sortcut" else ar(u)[:, None] * n + ar(n)
        own = u == v
        dense = lambda w: dense_selection(idx.flatten(2)[..., None], w.flatten(2)[..., None], v)  # noqa: E731
        fast = lambda q, k, val, w: sinkhorn_attention(  # noqa: E731
            q, k, val, bucket_size=s, kv_bucket_size=t, row_index=row_index, include_own=own,
            indices=idx.flatten(2), weights=w.flatten(2), kv_mask=kv_mask,
        )  # fmt: skip
        weights = w
        assert rows == (n if mode == "sortcut" else u * n)
    else:
        scores, _ = attention_sort_scores(q, k, bucket_size=s, kv_bucket_size=t)
        weights = gumbel_sinkhorn(scores.relu(), n_iters=5, temperature=0.75, noise=False)
        row_index = ar(n).expand(u, n) if mode == "sinkhorn-sortcut" else (ar(u)[:, None] + ar(n)) % u
        own = True
        dense = lambda w: w  # noqa: E731
        fast = lambda q, k, val, w: sinkhorn_attention(  # noqa: E731
            q, k, val, bucket_size=s, kv_bucket_size=t, row_index=row_index, include_own=own,
            reorder=w, kv_mask=kv_mask,
        )  # fmt: skip
    naive = lambda q, k, val, w: sinkhorn_attention_naive(  # noqa: E731
        q, k, val, bucket_size=s, kv_bucket_size=t, row_index=row_index, include_own=own,
        reorder=dense(w), kv_mask=kv_mask,
    )  # fmt: skip
    assert_same_forward_backward(fast, naive, [q, k, val, weights])


# (id, B, H, S, U, P, wrap_from, padding)
CAUSAL_CASES = [
    ("p1-nowrap", 2, 2, 7, 9, 1, 2, False),
    ("p2-halfwrap", 2, 4, 5, 7, 2, 2, False),
    ("p2-allwrap-pad", 2, 3, 5, 7, 2, 0, True),
    ("p3-halfwrap-pad", 1, 2, 4, 6, 3, 1, True),
]


PICKED_CASES = [c for c in CAUSAL_CASES if not c[-1]] + [
    ("p2-halfwrap-chunks", 1, 2, 64, 40, 2, 1, False)  # 2560 positions: two chunks of buckets
]


@pytest.mark.parametrize("backend", ["gathered", "picked"])
@pytest.mark.parametrize(
    "case", CAUSAL_CASES + PICKED_CASES[-1:], ids=[c[0] for c in CAUSAL_CASES + PICKED_CASES[-1:]]
)
def test_causal_bucket_attention_equals_naive(case, backend):
    _, b, h, s, u, p, wrap_from, padding = case
    if backend == "picked" and padding:
        pytest.skip("the picked backend runs without a padding mask (the gathered one takes it)")
    q, k, v = _inputs(b, h, u * s, u * s, 8, seed=u * p)
    null_k, null_v = randn(h, 8, seed=1), randn(h, 8, seed=2)
    mask = _padding(b, u * s, seed=p, bucket=s) if padding else None
    scores, valid = causal_sort_scores(q, k, bucket_size=s, n_null=p, mask=mask)
    idx, w = differentiable_topk(scores, p, temperature=0.75, valid=valid)
    assert bool(((idx < p) | (idx - p < torch.arange(u)[:, None])).all())  # only nulls or earlier buckets
    common = dict(bucket_size=s, wrap_from=wrap_from, mask=mask)
    fast = lambda q, k, v, nk, nv, w: causal_sinkhorn_attention(  # noqa: E731
        q, k, v, nk, nv, indices=idx, weights=w, backend=backend, **common
    )
    naive = lambda q, k, v, nk, nv, w: causal_sinkhorn_attention_naive(  # noqa: E731
        q, k, v, nk, nv, reorder=dense_selection(idx, w, p + u), **common
    )
    assert_same_forward_backward(fast, naive, [q, k, v, null_k, null_v, w])


def test_rotation_round_trip():
    x = randn(2, 5, 12, 3, seed=7)
    r = rotate_heads(x, 2, 3)
    assert torch.equal(r[:, :2], x[:, :2]) and torch.equal(r[:, 2:, 0], x[:, 2:, 3])
    assert torch.equal(unrotate_heads(r, 2, 3), x)


@pytest.mark.parametrize("offset", [0, 3], ids=["plain", "shifted"])
def test_decode_step_equals_full_rows(offset):
    """One step per position against caches gives the full op's rows (both head phases)."""
    b, h, s, u, p, d = 1, 2, 4, 5, 2, 6
    n = u * s
    q, k, v = _inputs(b, h, n, n, d, seed=11)
    null_k, null_v = randn(h, d, seed=3), randn(h, d, seed=4)
    wrap = 0 if offset else h
    qr, kr, vr = (rotate_heads(t, wrap, offset) for t in (q, k, v))
    scores, valid = causal_sort_scores(qr, kr, bucket_size=s, n_null=p)
    idx, w = differentiable_topk(scores, p, temperature=0.75, valid=valid)
    full = causal_sinkhorn_attention(
        qr, kr, vr, null_k, null_v, bucket_size=s, indices=idx, weights=w, wrap_from=wrap
    )
    full = unrotate_heads(full, wrap, offset)
    # the last position of a shifted sequence belongs to the wrapped bucket's row 0; skip it
    for pos in range(n - (1 if offset else 0)):
        rel = pos - offset
        sel = (None, None) if rel < 0 else (idx[:, :, rel // s], w[:, :, rel // s])
        step = dict(indices=sel[0], weights=sel[1], position=pos, offset=offset, bucket_size=s)
        caches = k[:, :, : pos + 1], v[:, :, : pos + 1]
        got = causal_sinkhorn_step(q[:, :, pos : pos + 1], *caches, null_k, null_v, **step)
        assert_close(got[:, :, 0], full[:, :, pos], 1e-5, name=f"position {pos}")
        if rel >= 0:
            # the picked buckets formed at the bucket's first position, kept by the caller
            first = offset + (rel // s) * s
            kept = tuple(
                picked_buckets(t[:, :, : first + 1], null, *sel, offset=offset, bucket_size=s)
                for t, null in ((k, null_k), (v, null_v))
            )
            again = causal_sinkhorn_step(q[:, :, pos : pos + 1], *caches, null_k, null_v, picked=kept, **step)
            assert torch.equal(again, got)


def test_bad_lengths_are_refused():
    q, k, v = _inputs(1, 1, 10, 10, 4, seed=0)
    with pytest.raises(ValueError, match="divisible by bucket_size"):
        sinkhorn_attention(
            q, k, v, bucket_size=4, kv_bucket_size=5, row_index=torch.zeros(2, 1, dtype=torch.long),
            include_own=False, indices=torch.zeros(1, 1, 2, dtype=torch.long), weights=torch.ones(1, 1, 2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="include_own"):
        sinkhorn_attention(
            q, k, v, bucket_size=5, kv_bucket_size=10, row_index=torch.zeros(2, 1, dtype=torch.long),
            include_own=True, indices=torch.zeros(1, 1, 1, dtype=torch.long), weights=torch.ones(1, 1, 1),
        )  # fmt: skip


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"bucket_size": 0}, ValueError, "bucket_size must be a positive int"),
        ({"bucket_size": -4, "kv_bucket_size": -4}, ValueError, "bucket_size must be a positive int"),
        ({"kv_bucket_size": 4.0}, ValueError, "kv_bucket_size must be a positive int"),
        ({"k": "short-batch"}, ValueError, r"k must be \[B, H, M, D\]"),
        ({"k": "double"}, TypeError, "share one dtype"),
        ({"kv_mask": "float"}, ValueError, "kv_mask must be a bool tensor"),
        ({"kv_mask": "short"}, ValueError, "kv_mask must be a bool tensor"),
    ],
    ids=[
        "bucket-0",
        "bucket-negative",
        "bucket-float",
        "k-batch",
        "mixed-dtypes",
        "mask-float",
        "mask-short",
    ],
)
def test_bad_arguments_are_named(change, error, match):
    """Each failed deep in torch (a division by zero, an invalid reshape, a size mismatch)."""
    q, k, v = _inputs(2, 2, 8, 8, 4, seed=0)
    kv_mask = torch.ones(2, 8, dtype=torch.bool)
    args = dict(k=k, bucket_size=4, kv_bucket_size=4, kv_mask=kv_mask) | change
    args["k"] = (
        {"short-batch": k[:1], "double": k.double()}.get(args["k"], args["k"])
        if isinstance(args["k"], str)
        else args["k"]
    )
    if isinstance(args["kv_mask"], str):
        args["kv_mask"] = kv_mask.float() if args["kv_mask"] == "float" else kv_mask[:, :7]
    with pytest.raises(error, match=match):
        sinkhorn_attention(
            q, args["k"], v, bucket_size=args["bucket_size"], kv_bucket_size=args["kv_bucket_size"],
            row_index=torch.arange(2)[:, None], include_own=True, reorder=torch.eye(2).expand(2, 2, 2, 2),
            kv_mask=args["kv_mask"],
        )  # fmt: skip


# --- layouts ---------------------------------------------------------------------------------
def test_split_and_merge_heads_equal_rotation_with_gradients():
    x = randn(2, 12, 3 * 4 * 5, seed=12)

    def fast(x):
        q, k, v = split_heads(x, 3, 4, rotate_from=2, shift=3)
        return merge_heads(q * k, v[:, :1], v[:, 1:], rotate_from=2, shift=3)

    def plain(x):
        q, k, v = (rotate_heads(t.unflatten(-1, (4, 5)).transpose(1, 2), 2, 3) for t in x.chunk(3, dim=-1))
        out = torch.cat([q * k, v[:, :1], v[:, 1:]], dim=1)
        return unrotate_heads(out, 2, 3).transpose(1, 2).flatten(2)

    def reference(x):
        q, k, v = split_heads_reference(x, 3, 4, rotate_from=2, shift=3)
        return merge_heads_reference(q * k, v[:, :1], v[:, 1:], rotate_from=2, shift=3)

    assert_same_forward_backward(fast, plain, [x])
    assert_same_forward_backward(reference, plain, [x])


@pytest.mark.parametrize("stacked, heads, rotate_from, shift", [(1, 3, None, 0), (2, 4, 0, 5), (3, 2, 1, -1)])
def test_split_and_merge_heads_references_equal_the_fused_functions(stacked, heads, rotate_from, shift):
    x = randn(2, 7, stacked * heads * 3, seed=18)
    fused = split_heads(x, stacked, heads, rotate_from=rotate_from, shift=shift)
    plain = split_heads_reference(x, stacked, heads, rotate_from=rotate_from, shift=shift)
    assert [tuple(t.shape) for t in plain] == [(2, heads, 7, 3)] * stacked
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert b.is_contiguous()
    options = dict(rotate_from=rotate_from, shift=shift)
    first = x[..., : heads * 3]  # merging the first tensor undoes the split of the first third
    torch.testing.assert_close(merge_heads(fused[0], **options), first, rtol=0, atol=0)
    torch.testing.assert_close(merge_heads_reference(plain[0], **options), first, rtol=0, atol=0)
    halves = (plain[-1][:, :1], plain[-1][:, 1:])
    torch.testing.assert_close(merge_heads_reference(*halves, **options), merge_heads(*halves, **options))


@pytest.mark.parametrize("own", [False, True], ids=["picks", "picks-own"])
def test_gather_weighted_equals_indexing(own):
    src, null = randn(3, 5, 8, seed=13), randn(3, 8, seed=14)
    picks = torch.randint(-1, 5, (3, 4, 2), generator=torch.Generator().manual_seed(15))
    w = randn(3, 4, 2, seed=16)
    extra = [randn(3, 4, 6, seed=17)] if own else []

    def fast(src, null, w, *extra):
        return gather_weighted(src, picks, w, null=null, own=extra[0] if extra else None)

    def plain(src, null, w, *extra):
        picked = src[torch.arange(3)[:, None, None], picks.clamp_min(0)]
        picked = torch.where((picks < 0)[..., None], null[:, None, None, :], picked) * w[..., None]
        return torch.cat([picked.flatten(2), *extra], dim=-1)

    assert_same_forward_backward(fast, plain, [src, null, w, *extra])
    with pytest.raises(ValueError, match="null"):
        gather_weighted(src, picks, w)


@pytest.mark.parametrize("case", PICKED_CASES[:-1], ids=[c[0] for c in PICKED_CASES[:-1]])
def test_causal_picked_backend_float64(case):
    """The picked backend (chunked, lean backward) in float64: equal to the reference to
    rounding, gradients of the null key / value and of the pick weights included."""
    _, b, h, s, u, p, wrap_from, _ = case
    gen = torch.Generator().manual_seed(u * p)
    q, k, v = (torch.randn(b, h, u * s, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    null_k, null_v = (torch.randn(h, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    scores, valid = causal_sort_scores(q, k, bucket_size=s, n_null=p)
    idx, w = differentiable_topk(scores, p, temperature=0.75, valid=valid)
    common = dict(bucket_size=s, wrap_from=wrap_from)
    fast = lambda q, k, v, nk, nv, w: causal_sinkhorn_attention(  # noqa: E731
        q, k, v, nk, nv, indices=idx, weights=w, backend="picked", **common
    )
    naive = lambda q, k, v, nk, nv, w: causal_sinkhorn_attention_naive(  # noqa: E731
        q, k, v, nk, nv, reorder=dense_selection(idx, w, p + u), **common
    )
    assert_same_forward_backward(fast, naive, [q, k, v, null_k, null_v, w], rtol=1e-10)


def test_causal_backends_refuse_what_they_cannot_run():
    q, k, v = _inputs(1, 2, 20, 20, 8, seed=0)
    idx = torch.zeros(1, 2, 4, 1, dtype=torch.long)
    w = torch.ones(1, 2, 4, 1)
    common = dict(bucket_size=5, indices=idx, weights=w, wrap_from=1)
    nk = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="picked backend"):
        causal_sinkhorn_attention(
            q, k, v, nk, nk, mask=torch.ones(1, 20, dtype=torch.bool), backend="picked", **common
        )
    with pytest.raises(ValueError, match="backend must be one of"):
        causal_sinkhorn_attention(q, k, v, nk, nk, backend="fast", **common)
