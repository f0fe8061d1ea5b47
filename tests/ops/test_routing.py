"""Routed attention ops: fast == naive (forward and gradients), strict causality, decoding
steps, k-means maths, edge cases and input errors."""

from __future__ import annotations

import pytest
import torch

from longrange.ops.routing import (
    assigned_routed_attention,
    assigned_routed_attention_naive,
    assigned_routed_step,
    balanced_routed_attention,
    balanced_routed_attention_naive,
    causal_routed_attention,
    causal_routed_attention_naive,
    causal_routed_step,
    cluster_keys,
    cluster_topk,
    kmeans,
    push_ring,
    ring_buffers,
)
from longrange.ops.routing.kmeans import (
    Kmeans,
    commitment_loss,
    ema_,
    init_means,
    lloyd_step,
    nearest,
)
from longrange.ops.routing.spans import local_attention_spans, span_attention
from longrange.testing import assert_close, assert_same_forward_backward


def _qkv(b, h, n, d, *, m=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    k = torch.randn(b, h, m, d, generator=gen, dtype=dtype)
    v = torch.randn(b, h, m, d + 2, generator=gen, dtype=dtype)
    return q, k, v, gen


def _mem(h, c, k, d, gen, dtype=torch.float64):
    return torch.randn(h, c, k, d, generator=gen, dtype=dtype), torch.randn(
        h, c, k, d + 2, generator=gen, dtype=dtype
    )


CAUSAL_CASES = [
    pytest.param(2, 2, 63, 8, 4, 1, False, False, None, id="odd-n63-w8-mem1"),
    pytest.param(1, 3, 50, 5, 3, 0, True, False, None, id="shared-no-mem-w5"),
    pytest.param(2, 2, 70, 16, 4, 2, False, True, 4, id="masked-mem2-block4"),
    pytest.param(1, 2, 45, 8, 3, 1, True, True, 3, id="shared-masked-block3"),
    pytest.param(1, 1, 7, 16, 2, 1, False, False, None, id="window-longer-than-n"),
    pytest.param(1, 2, 33, 1, 4, 1, False, False, None, id="window-1"),
]


@pytest.mark.parametrize("b, h, n, w, c, k_mem, shared, masked, block", CAUSAL_CASES)
def test_causal_matches_naive(b, h, n, w, c, k_mem, shared, masked, block):
    q, k, v, gen = _qkv(b, h, n, 8)
    clusters = torch.randint(0, c, (b, h, n), generator=gen)
    mem_k, mem_v = _mem(h, c, k_mem, 8, gen)
    mask = torch.rand(b, n, generator=gen) > 0.25 if masked else None
    opts = dict(window_size=w, mask=mask, shared_qk=shared)

    def fast(q, k, v, mk, mv):
        return causal_routed_attention(q, k, v, clusters, mem_k=mk, mem_v=mv, block_size=block, **opts)

    def naive(q, k, v, mk, mv):
        return causal_routed_attention_naive(q, k, v, clusters, mem_k=mk, mem_v=mv, **opts)

    assert_same_forward_backward(fast, naive, [q, k, v, mem_k, mem_v], rtol=1e-9)


SPANS_CASES = [
    pytest.param(2, 2, 63, 8, 4, 1, False, False, None, torch.float64, id="odd-n63-w8-mem1"),
    pytest.param(2, 2, 70, 16, 4, 2, False, True, 4, torch.float64, id="masked-mem2-block4"),
    pytest.param(1, 2, 45, 8, 3, 1, True, True, 3, torch.float64, id="shared-masked-block3"),
    pytest.param(1, 3, 50, 5, 3, 0, False, False, None, torch.float64, id="no-mem-w5"),
    pytest.param(1, 1, 7, 16, 2, 1, True, False, None, torch.float64, id="window-longer-than-n"),
    pytest.param(1, 2, 33, 1, 4, 1, False, False, None, torch.float64, id="window-1"),
    # several chunks of blocks (the op works in chunks of 2048 queries)
    pytest.param(1, 2, 4500, 64, 40, 1, True, False, None, torch.float32, id="chunks-fp32"),
]


@pytest.mark.parametrize("b, h, n, w, c, k_mem, shared, masked, block, dtype", SPANS_CASES)
def test_causal_spans_backend_matches_naive(b, h, n, w, c, k_mem, shared, masked, block, dtype):
    """The span backend (strided spans, memory keys merged by log-sum-exp, chunked lean
    backward) against the dense reference, forward and every gradient."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, n, 8, generator=gen, dtype=dtype) for _ in range(3))
    if shared:
        k = torch.nn.functional.normalize(q, dim=-1)
    clusters = torch.randint(0, c, (b, h, n), generator=gen)
    mem_k, mem_v = (torch.randn(h, c, k_mem, 8, generator=gen, dtype=dtype) for _ in range(2))
    mask = torch.rand(b, n, generator=gen) > 0.25 if masked else None
    opts = dict(window_size=w, mask=mask, shared_qk=shared)

    def fast(q, k, v, mk, mv):
        return causal_routed_attention(
            q, k, v, clusters, mem_k=mk, mem_v=mv, block_size=block, backend="spans", **opts
        )

    def naive(q, k, v, mk, mv):
        return causal_routed_attention_naive(q, k, v, clusters, mem_k=mk, mem_v=mv, **opts)

    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    assert_same_forward_backward(fast, naive, [q, k, v, mem_k, mem_v], rtol=rtol)


def test_causal_auto_backend_picks_spans_only_where_they_apply():
    q, k, v, gen = _qkv(1, 2, 40, 8)  # v wider than q: the span kernels need equal widths
    clusters = torch.randint(0, 3, (1, 2, 40), generator=gen)
    with pytest.raises(ValueError, match="spans backend"):
        causal_routed_attention(q, k, v, clusters, window_size=4, backend="spans")
    with pytest.raises(ValueError, match="spans backend"):
        causal_routed_attention(q, k, q, clusters, window_size=4, backend="spans", dropout=0.1)
    with pytest.raises(ValueError, match="backend must be"):
        causal_routed_attention(q, k, q, clusters, window_size=4, backend="fast")
    auto = causal_routed_attention(q, k, q, clusters, window_size=4)
    blocked = causal_routed_attention(q, k, q, clusters, window_size=4, backend="blocked")
    assert_close(auto, blocked, rtol=1e-12)


@pytest.mark.parametrize(
    "n, window, look_back, look_ahead, dtype",
    [(300, 16, 1, None, torch.float64), (256, 32, 2, None, torch.float64), (7, 16, 1, None, torch.float64),
     (4500, 128, 1, None, torch.float32), (300, 16, 1, 1, torch.float64), (256, 32, 2, 1, torch.float64),
     (70, 16, 1, 2, torch.float64), (7, 16, 1, 1, torch.float64), (4500, 128, 1, 1, torch.float32)],
    ids=["odd", "look-back-2", "shorter-than-window", "chunks-fp32", "non-causal-odd",
         "non-causal-look-back-2", "non-causal-look-ahead-2", "non-causal-shorter-than-window",
         "non-causal-chunks-fp32"],
)  # fmt: skip
def test_local_spans_match_local_attention(n, window, look_back, look_ahead, dtype):
    """Local heads on the span kernels equal the local-attention op, causal (look_ahead None)
    and not (rotary positions applied at absolute positions beforehand, which only position
    differences can tell apart); padding at either end is masked."""
    from longrange.ops.local import local_attention

    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen, dtype=dtype) for _ in range(3))
    causal = look_ahead is None

    def fast(q, k, v):
        return local_attention_spans(
            q, k, v, window_size=window, causal=causal, look_backward=look_back, look_forward=look_ahead or 0
        )

    def reference(q, k, v):
        return local_attention(
            q, k, v, window_size=window, causal=causal, look_backward=look_back, look_forward=look_ahead or 0
        )

    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    assert_same_forward_backward(fast, reference, [q, k, v], rtol=rtol)


def test_span_arguments_that_do_not_go_together_raise():
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="look_forward=0"):
        local_attention_spans(q, q, q, window_size=8, causal=True, look_forward=1)
    groups = torch.zeros(1, 40, dtype=torch.int32)
    band = torch.ones(1, 8, 24, dtype=torch.bool)
    with pytest.raises(ValueError, match="look_ahead=0"):
        span_attention(q[0], q[0], q[0], groups, band, block=8, look_back=1, scale=1.0, look_ahead=1)


def test_span_attention_without_any_key_gives_zeros():
    """A query whose group has no key in its span (and no memory key) gets zeros, no NaN."""
    q = torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 12, 4, dtype=torch.float64)
    groups = torch.tensor([[-2] * 4 + [0, 1, 1, 2, 2, 2, 3, 3]], dtype=torch.int32)
    distance = 4 + torch.arange(4)[:, None] - torch.arange(8)
    band = ((distance > 0) & (distance < 4))[None]  # the 3 keys before, never itself
    out = span_attention(q, k, k, groups, band, block=4, look_back=1, scale=0.5)
    out.sum().backward()
    assert out[0, [0, 1, 3, 6]].abs().max() == 0  # first of each group: its own key is banned
    assert out[0, [2, 4, 5, 7]].abs().min() > 0
    assert torch.isfinite(q.grad).all()


def test_causal_float32_matches_naive():
    q, k, v, gen = _qkv(2, 2, 129, 16, dtype=torch.float32)
    clusters = torch.randint(0, 5, (2, 2, 129), generator=gen)
    mem_k, mem_v = _mem(2, 5, 1, 16, gen, torch.float32)
    fast = causal_routed_attention(q, k, v, clusters, window_size=16, mem_k=mem_k, mem_v=mem_v)
    naive = causal_routed_attention_naive(q, k, v, clusters, window_size=16, mem_k=mem_k, mem_v=mem_v)
    assert_close(fast, naive, rtol=1e-5)


def test_causal_is_strictly_causal():
    """Changing the future (its queries, keys, values and clusters) leaves the past alone."""
    q, k, v, gen = _qkv(2, 2, 60, 8, dtype=torch.float32)
    clusters = torch.randint(0, 3, (2, 2, 60), generator=gen)
    mem_k, mem_v = _mem(2, 3, 1, 8, gen, torch.float32)
    base = causal_routed_attention(q, k, v, clusters, window_size=6, mem_k=mem_k, mem_v=mem_v)
    for t in (0, 17, 40):
        q2, k2, v2, c2 = q.clone(), k.clone(), v.clone(), clusters.clone()
        q2[:, :, t + 1 :] = torch.randn_like(q2[:, :, t + 1 :])
        k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :])
        v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :])
        c2[:, :, t + 1 :] = torch.randint(0, 3, c2[:, :, t + 1 :].shape)
        out = causal_routed_attention(q2, k2, v2, c2, window_size=6, mem_k=mem_k, mem_v=mem_v)
        # exact maths; only the summation order of masked-out blocks may differ
        assert (out[:, :, : t + 1] - base[:, :, : t + 1]).abs().max() < 1e-6, t


def test_causal_padding_never_takes_a_window_slot():
    """Padded tokens inside the sequence do not push real keys out of a window."""
    q, k, v, _ = _qkv(1, 1, 40, 8)
    clusters = torch.zeros(1, 1, 40, dtype=torch.long)
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[:, 10:20] = False
    keep = mask[0]
    padded = causal_routed_attention(q, k, v, clusters, window_size=4, mask=mask)
    compact = causal_routed_attention(
        q[:, :, keep], k[:, :, keep], v[:, :, keep], clusters[:, :, keep], window_size=4
    )
    assert_close(padded[:, :, keep], compact, rtol=1e-12)
    assert padded[:, :, ~keep].abs().max() == 0


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared-qk"])
def test_decoding_steps_equal_full_rows(shared):
    q, k, v, gen = _qkv(2, 2, 57, 8)
    if shared:
        k = torch.nn.functional.normalize(q, dim=-1)
    clusters = torch.randint(0, 4, (2, 2, 57), generator=gen)
    mem_k, mem_v = _mem(2, 4, 1, 8, gen)
    opts = dict(mem_k=mem_k, mem_v=mem_v, shared_qk=shared)
    full = causal_routed_attention(q, k, v, clusters, window_size=5, **opts)
    start = 20
    k_buf, v_buf, counts = ring_buffers(
        k[:, :, :start], v[:, :, :start], clusters[:, :, :start], num_clusters=4, window_size=5
    )
    rows = []
    for i in range(start, 57):
        push_ring(k_buf, v_buf, counts, k[:, :, i : i + 1], v[:, :, i : i + 1], clusters[:, :, i])
        rows.append(causal_routed_step(q[:, :, i : i + 1], k_buf, v_buf, counts, clusters[:, :, i], **opts))
    assert_close(torch.cat(rows, dim=2), full[:, :, start:], rtol=1e-10)


BALANCED_CASES = [
    pytest.param(2, 2, 63, 8, 4, 1, False, False, False, id="plain-odd"),
    pytest.param(1, 2, 48, 6, 3, 2, True, True, False, id="shared-masked-mem2"),
    pytest.param(2, 1, 40, 8, 5, 0, False, True, True, id="causal-mask-no-mem"),
]


@pytest.mark.parametrize("b, h, n, w, c, k_mem, shared, masked, causal", BALANCED_CASES)
def test_balanced_matches_naive(b, h, n, w, c, k_mem, shared, masked, causal):
    q, k, v, gen = _qkv(b, h, n, 8)
    q_index = cluster_topk(torch.randn(b, h, n, c, generator=gen), w)
    k_index = q_index if shared else cluster_topk(torch.randn(b, h, n, c, generator=gen), w)
    mem_k, mem_v = _mem(h, c, k_mem, 8, gen)
    mask = torch.rand(b, n, generator=gen) > 0.25 if masked else None
    opts = dict(q_mask=mask, k_mask=mask, causal=causal, shared_qk=shared)

    def fast(q, k, v, mk, mv):
        return balanced_routed_attention(q, k, v, q_index, k_index, mem_k=mk, mem_v=mv, **opts)

    def naive(q, k, v, mk, mv):
        return balanced_routed_attention_naive(q, k, v, q_index, k_index, mem_k=mk, mem_v=mv, **opts)

    assert_same_forward_backward(fast, naive, [q, k, v, mem_k, mem_v], rtol=1e-9)


@pytest.mark.parametrize("block", [None, 3], ids=["block-w", "block-3"])
def test_assigned_matches_naive_and_is_causal_in_queries(block):
    q, k, v, gen = _qkv(2, 2, 41, 8, m=37)
    q_clusters = torch.randint(0, 4, (2, 2, 41), generator=gen)
    k_index = cluster_topk(torch.randn(2, 2, 37, 4, generator=gen), 9)
    mem_k, mem_v = _mem(2, 4, 1, 8, gen)
    q_mask = torch.rand(2, 41, generator=gen) > 0.2
    k_mask = torch.rand(2, 37, generator=gen) > 0.2
    opts = dict(q_mask=q_mask, k_mask=k_mask)

    def fast(q, k, v, mk, mv):
        return assigned_routed_attention(
            q, k, v, q_clusters, k_index, mem_k=mk, mem_v=mv, block_size=block, **opts
        )

    def naive(q, k, v, mk, mv):
        return assigned_routed_attention_naive(q, k, v, q_clusters, k_index, mem_k=mk, mem_v=mv, **opts)

    assert_same_forward_backward(fast, naive, [q, k, v, mem_k, mem_v], rtol=1e-9)
    base = fast(q, k, v, mem_k, mem_v)
    q2, c2 = q.clone(), q_clusters.clone()
    q2[:, :, 20:] = torch.randn_like(q2[:, :, 20:])
    c2[:, :, 20:] = torch.randint(0, 4, c2[:, :, 20:].shape)
    out = assigned_routed_attention(q2, k, v, c2, k_index, mem_k=mem_k, mem_v=mem_v, block_size=block, **opts)
    assert (out[:, :, :20] - base[:, :, :20]).abs().max() < 1e-12


def test_assigned_step_equals_full_rows():
    q, k, v, gen = _qkv(2, 2, 23, 8, m=30)
    q_clusters = torch.randint(0, 3, (2, 2, 23), generator=gen)
    k_index = cluster_topk(torch.randn(2, 2, 30, 3, generator=gen), 7)
    mem_k, mem_v = _mem(2, 3, 1, 8, gen)
    k_mask = torch.rand(2, 30, generator=gen) > 0.3
    full = assigned_routed_attention(q, k, v, q_clusters, k_index, mem_k=mem_k, mem_v=mem_v, k_mask=k_mask)
    keys, values, kept = cluster_keys(k, v, k_index, mem_k=mem_k, mem_v=mem_v, k_mask=k_mask)
    rows = [
        assigned_routed_step(q[:, :, i : i + 1], q_clusters[:, :, i], keys, values, kept) for i in range(23)
    ]
    assert_close(torch.cat(rows, dim=2), full, rtol=1e-10)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_half_precision_and_empty_rows_have_no_nan(dtype):
    q, k, v, gen = _qkv(1, 2, 33, 8, dtype=dtype)
    clusters = torch.randint(0, 3, (1, 2, 33), generator=gen)
    mask = torch.zeros(1, 33, dtype=torch.bool)
    mask[:, ::4] = True
    # no memory and shared_qk: a query alone in its cluster sees itself; fully padded rows give 0
    out = causal_routed_attention(q, k, v, clusters, window_size=4, mask=mask, shared_qk=True)
    assert torch.isfinite(out).all()
    q_index = cluster_topk(torch.randn(1, 2, 33, 3, generator=gen), 8)
    out = balanced_routed_attention(q, k, v, q_index, q_index, q_mask=mask, k_mask=mask)
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_before_work():
    q, k, v, _ = _qkv(1, 2, 10, 8, dtype=torch.float32)
    clusters = torch.zeros(1, 2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="window_size"):
        causal_routed_attention(q, k, v, clusters, window_size=0)
    with pytest.raises(ValueError, match="clusters"):
        causal_routed_attention(q, k, v, clusters[..., :5], window_size=4)
    with pytest.raises(TypeError, match="clusters"):
        causal_routed_attention(q, k, v, clusters.float(), window_size=4)
    with pytest.raises(ValueError, match="mask"):
        causal_routed_attention(q, k, v, clusters, window_size=4, mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mem_k"):
        causal_routed_attention(q, k, v, clusters, window_size=4, mem_k=torch.zeros(3, 1, 1, 8), mem_v=None)
    with pytest.raises(ValueError, match="q_index"):
        balanced_routed_attention(
            q, k, v, torch.full((1, 2, 2, 3), 10), torch.zeros(1, 2, 2, 3, dtype=torch.long)
        )
    with pytest.raises(TypeError, match="q must be"):
        causal_routed_attention(q.long(), k, v, clusters, window_size=4)


def _clustered_points(seed=0, heads=2, centres=4, n=256, d=8, spread=0.1):
    gen = torch.Generator().manual_seed(seed)
    true = torch.nn.functional.normalize(torch.randn(heads, centres, d, generator=gen), dim=-1)
    pick = torch.randint(0, centres, (2, heads, n), generator=gen)
    heads_idx = torch.arange(heads)[:, None]
    x = true[heads_idx, pick] + spread * torch.randn(2, heads, n, d, generator=gen)
    return torch.nn.functional.normalize(x, dim=-1), true, gen


def test_kmeans_moves_means_toward_data_and_commitment_falls():
    x, true, gen = _clustered_points()
    means = torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=gen), dim=-1)
    losses = []
    for _ in range(30):
        buckets = nearest(x, means)
        losses.append(float(commitment_loss(x, means, buckets)))
        ema_(means, lloyd_step(x, means, buckets), 0.8)
        means = torch.nn.functional.normalize(means, dim=-1)
    assert losses[-1] < 0.5 * losses[0]
    # each true centre has a mean close to it
    closeness = torch.einsum("hcd,hkd->hck", true, means).amax(dim=-1)
    assert closeness.min() > 0.9


def test_kmeans_centroids_move_as_in_float32_in_a_half_precision_model():
    """model.to(bfloat16) made the centroids bfloat16, whose resolution near 1 is coarser than
    an EMA step (0.001 of the way at the default decay): 500 updates toward fixed targets
    went 6% of the way instead of 39%. They stay float32 now, and move as a float32 module's."""
    targets = torch.nn.functional.normalize(
        torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3)), dim=-1
    )
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        kmeans = Kmeans(2, 8, 4).to(dtype)
        assert kmeans.means.dtype == torch.float32
        start = kmeans.means.clone()
        for _ in range(500):
            kmeans.update(targets.to(dtype))
        moved[dtype] = (start - targets).norm() - (kmeans.means - targets).norm()
    assert_close(moved[torch.bfloat16], moved[torch.float32], 1e-2)
    assert moved[torch.float32] > 0.3 * (start - targets).norm()


def test_kmeans_init_from_data_and_weights():
    x, _, gen = _clustered_points(seed=1)
    means = init_means(x, 4, iters=10, generator=gen)
    assert means.shape == (2, 4, 8)
    assert torch.allclose(means.norm(dim=-1), torch.ones(2, 4))
    buckets = nearest(x, means)
    assert float(commitment_loss(x, means, buckets)) < 0.05
    # weight-0 points never move a centroid
    weights = torch.zeros(2, x.shape[2], dtype=torch.bool)
    assert torch.equal(lloyd_step(x, means, buckets, weights), means)


def _distinct_centroids(means):
    """Largest cosine between two different centroids of a head."""
    sims = torch.einsum("hcd,hkd->hck", means, means) - 2 * torch.eye(means.shape[1])
    return float(sims.amax())


@pytest.mark.parametrize("case", ["fewer-points", "identical-rows", "few-kept"])
def test_kmeans_init_never_repeats_a_centroid(case):
    """Too few (distinct, kept) points for C centroids: the missing centroids come from the
    fallback instead of repeating a point, so no centroid is a dead copy of another."""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1, 2, 3, 8, generator=gen), dim=-1)
    points, weights = x[0], None  # points [H, N, D]: those a centroid may come from
    if case == "identical-rows":
        points = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=gen), dim=-1)
        x = points.expand(3, -1, -1, -1)
    elif case == "few-kept":
        x = torch.nn.functional.normalize(torch.randn(2, 2, 16, 8, generator=gen), dim=-1)
        weights = torch.zeros(2, 16, dtype=torch.bool)
        weights[0, :3] = True
        points = x[0, :, :3]
    fallback = torch.nn.functional.normalize(torch.randn(2, 8, 8, generator=gen), dim=-1)
    means = init_means(x, 8, iters=0, weights=weights, generator=gen, fallback=fallback)
    assert _distinct_centroids(means) < 0.999
    # each centroid is a (kept) point or the fallback's centroid of its slot
    from_points = torch.einsum("hcd,hnd->hcn", means, points).amax(-1) > 1 - 1e-6
    from_fallback = (means - fallback).abs().amax(-1) < 1e-6
    assert bool((from_points | from_fallback).all())
    assert int(from_points.sum(-1).min()) == (5 if case == "identical-rows" else 3)
    # after Lloyd iterations the centroids stay apart
    assert _distinct_centroids(init_means(x, 8, weights=weights, generator=gen)) < 0.999


def test_kmeans_initialises_in_training_from_enough_distinct_points():
    """No initialisation in eval mode, nor from fewer points than clusters (the constructor's
    centroids stay and a later call initialises); from enough points the draw is unchanged:
    the first C of a random permutation of the points."""
    torch.manual_seed(0)
    kmeans = Kmeans(2, 8, 4)
    before = kmeans.means.clone()
    x = torch.randn(1, 2, 64, 8)
    kmeans.eval()(x)
    kmeans.train()(x[:, :, :3])
    kmeans(x, weights=torch.arange(64)[None] < 3)  # three kept points
    assert torch.equal(kmeans.means, before) and not bool(kmeans.initted)
    torch.manual_seed(1)
    kmeans(x)
    assert bool(kmeans.initted)
    torch.manual_seed(1)
    xn = torch.nn.functional.normalize(x, dim=-1)
    pick = torch.randperm(64)[:4]
    expected = xn[0][:, pick]
    for _ in range(10):
        expected = lloyd_step(xn, expected)
    assert_close(kmeans.means, expected, rtol=1e-6)
    kmeans(torch.randn(1, 2, 64, 8))  # initialised once
    assert_close(kmeans.means, expected, rtol=1e-6)


def test_empty_cluster_keeps_its_mean():
    x, _, gen = _clustered_points(seed=2, centres=2)
    means = torch.nn.functional.normalize(torch.randn(2, 3, 8, generator=gen), dim=-1)
    buckets = torch.zeros(2, 2, x.shape[2], dtype=torch.long)
    new = lloyd_step(x, means, buckets)
    assert torch.equal(new[:, 1:], means[:, 1:])


def test_lloyd_step_is_each_clusters_normalised_weighted_sum():
    """Against a loop over batch rows, heads and clusters: the sum of each cluster's weighted
    points over the batch, normalised; a cluster with no (weighted) point keeps its mean."""
    gen = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(3, 2, 40, 8, generator=gen), dim=-1)
    means = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=gen), dim=-1)
    buckets = torch.randint(0, 5, (3, 2, 40), generator=gen)  # cluster 5 stays empty
    weights = torch.rand(3, 40, generator=gen) > 0.3
    got = lloyd_step(x, means, buckets, weights)
    want = means.clone()
    for h in range(2):
        for c in range(6):
            rows = [(b, i) for b in range(3) for i in range(40) if buckets[b, h, i] == c and weights[b, i]]
            picked = [x[b, h, i] for b, i in rows]
            if picked:
                want[h, c] = torch.nn.functional.normalize(torch.stack(picked).sum(0), dim=-1)
    assert_close(got, want, 1e-6)


@pytest.mark.parametrize("paired", [False, True], ids=["points", "pairs"])
def test_nearest_in_pieces_equals_the_whole_matrix(paired, monkeypatch):
    monkeypatch.setattr(kmeans, "NEAREST_PIECE", 7)
    x, _, gen = _clustered_points(seed=3, n=50)
    means = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=gen), dim=-1)
    sims = kmeans.similarities(x, means)
    if paired:
        token = (sims[:, :, :25] + sims[:, :, 25:]).argmax(dim=-1)
        expected = torch.cat((token, token), dim=-1)
    else:
        expected = sims.argmax(dim=-1)
    assert torch.equal(kmeans.nearest_in_pieces(x, means, paired=paired), expected)


def test_commitment_loss_is_the_mean_squared_distance_with_its_gradient():
    x, _, gen = _clustered_points(seed=4, n=30)
    x = x.double().requires_grad_()
    means = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)  # not unit vectors
    buckets = torch.randint(0, 4, (2, 2, 30), generator=gen)
    weights = torch.rand(2, 30, generator=gen) > 0.3
    heads = torch.arange(2)[:, None]
    direct = ((x - means[heads, buckets]) ** 2).mean(-1)
    w = weights[:, None].double().expand_as(direct)
    expected = (direct * w).sum() / w.sum()
    got = commitment_loss(x, means, buckets, weights)
    assert_close(got, expected, rtol=1e-12)
    (g_got,) = torch.autograd.grad(got, x)
    (g_expected,) = torch.autograd.grad(expected, x)
    assert_close(g_got, g_expected, rtol=1e-10)


@pytest.mark.parametrize("shape", [(2, 2, 0, 4), (0, 2, 9, 4), (2, 0, 9, 4)], ids=["n0", "batch0", "heads0"])
@pytest.mark.parametrize("backend", ["auto", "blocked", "spans"])
def test_no_batch_heads_or_positions_give_an_empty_output_with_gradients(shape, backend):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    clusters = torch.zeros(shape[:3], dtype=torch.long)
    mem_k, mem_v = _mem(shape[1], 2, 1, 4, torch.Generator().manual_seed(0))
    out = causal_routed_attention(
        x, x, x, clusters, window_size=3, mem_k=mem_k, mem_v=mem_v[..., :4], backend=backend
    )
    out.sum().backward()
    assert out.shape == shape and x.grad.shape == shape
    for causal in (True, False):
        out = local_attention_spans(x, x, x, window_size=3, causal=causal)
        assert out.shape == shape


@pytest.mark.parametrize(
    "options, name",
    [({"window_size": 0}, "window_size"), ({"window_size": 4.0}, "window_size"),
     ({"window_size": 4, "look_backward": -1}, "look_backward"),
     ({"window_size": 4, "look_forward": -1, "causal": False}, "look_forward")],
    ids=["window-0", "window-float", "look-backward-negative", "look-forward-negative"],
)  # fmt: skip
def test_local_spans_refuse_bad_window_arguments_by_name(options, name):
    """A zero window divided by zero; a negative look-back killed the process (SIGFPE)."""
    q = torch.randn(1, 1, 12, 4)
    with pytest.raises(ValueError, match=name):
        local_attention_spans(q, q, q, **{"causal": True, **options})


def test_routing_options_dtypes_and_cluster_counts_are_refused_by_name():
    q, k, v, gen = _qkv(1, 2, 10, 4)
    clusters = torch.zeros(1, 2, 10, dtype=torch.long)
    index = cluster_topk(torch.randn(1, 2, 10, 3, generator=gen, dtype=torch.float64), 4)
    mem_k, mem_v = _mem(2, 2, 1, 4, gen)  # 2 clusters against the index's 3
    with pytest.raises(TypeError, match="dtype"):
        causal_routed_attention(q, k.float(), v, clusters, window_size=4)
    with pytest.raises(TypeError, match="dtype"):
        balanced_routed_attention(q, k, v.float(), index, index)
    for bad in (-0.1, 1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="dropout"):
            causal_routed_attention(q, k, v, clusters, window_size=4, dropout=bad)
        with pytest.raises(ValueError, match="dropout"):
            assigned_routed_attention(q, k, v, clusters, index, dropout=bad)
    for bad in (float("nan"), float("inf"), "a"):
        with pytest.raises(ValueError, match="scale"):
            causal_routed_attention(q, k, v, clusters, window_size=4, scale=bad)
        with pytest.raises(ValueError, match="scale"):
            balanced_routed_attention(q, k, v, index, index, scale=bad)
    with pytest.raises(ValueError, match="mem_k"):
        balanced_routed_attention(q, k, v, index, index, mem_k=mem_k, mem_v=mem_v)
    with pytest.raises(ValueError, match="mem_k"):
        assigned_routed_attention(q, k, v, clusters, index, mem_k=mem_k, mem_v=mem_v)
    with pytest.raises(ValueError, match="q_index"):
        balanced_routed_attention(q, k, v, index, index[:, :, :2])
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="block_size"):
            assigned_routed_attention(q, k, v, clusters, index, block_size=bad)
    for bad in (11, -1, 2.0):
        with pytest.raises(ValueError, match="size"):
            cluster_topk(torch.randn(1, 2, 10, 3), bad)
