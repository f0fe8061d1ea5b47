"""ops/favor: chunked causal linear attention equals the explicit kernel matrix (forward and every
gradient), the running stabiliser keeps outputs independent of later keys and finite in half
precision, padding removes keys from the normaliser, decoding steps equal the chunked pass, and
FAVOR+ approximates softmax attention better with more (and orthogonal) features."""

from __future__ import annotations

import math

import pytest
import torch

from longrange.ops.dense import dense_attention_naive
from longrange.ops.favor import (
    FavorState,
    causal_linear_attention,
    causal_linear_attention_step,
    chunk_causal_linear_attention,
    gaussian_orthogonal_random_matrix,
    generalized_features,
    linear_attention,
    linear_attention_naive,
    no_projection_features,
    softmax_key_features,
    softmax_query_features,
)
from longrange.ops.favor.chunk import _block_size, scan_sums, scan_sums_backward
from longrange.ops.favor.fused import softmax_causal_attention, softmax_causal_step
from longrange.ops.favor.fused_noncausal import softmax_noncausal_attention
from longrange.testing import assert_close, assert_same_forward_backward, relative_error


def qkv(batch, heads, n, dim, *, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, dim, generator=gen) * scale).to(dtype) for _ in range(3)]


def projection(m, d, seed=0, **kw):
    return gaussian_orthogonal_random_matrix(m, d, generator=torch.Generator().manual_seed(seed), **kw)


def softmax_causal(chunk_size, proj, backend="chunk"):
    def fn(q, k, v):
        fq = softmax_query_features(q, proj)
        fk, scale = softmax_key_features(k, proj, causal=True)
        return causal_linear_attention(fq, fk, v, log_scale=scale, chunk_size=chunk_size, backend=backend)[0]

    return fn


# (id, n, chunk size): odd lengths, chunks that do not divide n, one chunk, chunk of one
CHUNK_CASES = [
    ("n63-c16", 63, 16),
    ("n100-c7", 100, 7),
    ("n37-c64", 37, 64),
    ("n29-c1", 29, 1),
    ("n128-c32", 128, 32),
]


@pytest.mark.parametrize("n,chunk", [c[1:] for c in CHUNK_CASES], ids=[c[0] for c in CHUNK_CASES])
def test_chunked_causal_equals_naive_forward_and_gradients(n, chunk):
    proj = projection(24, 16)
    inputs = qkv(2, 2, n, 16, seed=n)
    assert_same_forward_backward(softmax_causal(chunk, proj), softmax_causal(chunk, proj, "naive"), inputs)


@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 16)], ids=["n37-c8", "n64-c16"])
def test_fused_softmax_equals_features_then_chunks(n, chunk):
    proj = projection(24, 16)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, 20:] = False

    def fused(q, k, v):
        return softmax_causal_attention(q, k, v, proj, mask=mask, chunk_size=chunk)[0]

    def unfused(q, k, v):
        fq = softmax_query_features(q, proj)
        fk, scale = softmax_key_features(k, proj, causal=True, mask=mask)
        return linear_attention_naive(fq, fk, v, causal=True, log_scale=scale)

    assert_same_forward_backward(fused, unfused, qkv(2, 2, n, 16, seed=n))
    q, k, v = qkv(2, 2, n, 16, seed=1)
    first, state = softmax_causal_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], proj, mask=mask[:, :20])
    rest, _ = softmax_causal_attention(
        q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], proj, mask=mask[:, 20:], state=state, chunk_size=chunk
    )
    assert_close(torch.cat((first, rest), dim=2), fused(q, k, v), 1e-5)


# (id, keep_bytes, segment_bytes): everything kept for backward (one segment, segments of two
# chunks); formed again in backward, segments of a chunk, of two (the last one shorter), of all
KEEP_CASES = [
    ("kept", None, None),
    ("kept-segments-of-2", 2**30, "two chunks"),
    ("segments-of-1", 0, 1),
    ("segments-of-2", 0, "two chunks"),
    ("one-segment-recomputed", 0, 2**30),
]


@pytest.mark.parametrize("keep,segment", [c[1:] for c in KEEP_CASES], ids=[c[0] for c in KEEP_CASES])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "continued"])
def test_fused_softmax_paths_equal_the_kernel_matrix(keep, segment, with_state):
    """Whatever backward keeps, forward, every gradient (the state's sums too) and the
    final state equal the features-then-explicit-kernel reference, masks and padding included."""
    n, chunk, m = 45, 8, 24
    proj = projection(m, 16)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, :6] = False
    mask[1, 30:] = False
    options = {}
    if keep is not None:
        per_chunk = 2 * (m + chunk) * chunk * 2 * 2 * 8  # float64 bytes of one chunk's features
        options = dict(keep_bytes=keep, segment_bytes=2 * per_chunk if segment == "two chunks" else segment)
    q, k, v = qkv(2, 2, n + 10, 16, seed=5, dtype=torch.float64)
    _, prefix = softmax_causal_attention(
        q[:, :, :10], k[:, :, :10], v[:, :, :10], proj.double(), chunk_size=4
    )
    state = FavorState(prefix.kv.requires_grad_(), prefix.log_scale) if with_state else None

    def fused(q, k, v):
        out, final = softmax_causal_attention(
            q, k, v, proj.double(), mask=mask, chunk_size=chunk, state=state, **options
        )
        return torch.cat((out.flatten(), final.kv.flatten()))

    def reference(q, k, v):
        # the continued sequence is the prefix and the new positions in one explicit pass
        start = 10 if with_state else 0
        qs, ks, vs = (
            torch.cat((t0[:, :, :10].detach(), t), 2) if with_state else t
            for t0, t in ((q0, q), (k0, k), (v0, v))
        )
        keep_all = torch.cat((torch.ones(2, 10, dtype=torch.bool), mask), 1) if with_state else mask
        fq = softmax_query_features(qs, proj.double())
        fk, scale = softmax_key_features(ks, proj.double(), causal=True, mask=keep_all)
        out = linear_attention_naive(fq, fk, vs, causal=True, log_scale=scale)[:, :, start:]
        weights = (scale - scale[..., -1:]).exp()[..., None] * fk  # sums relative to the last stabiliser
        kv = weights.transpose(-1, -2) @ torch.cat((vs, torch.ones_like(vs[..., :1])), -1)
        return torch.cat((out.flatten(), kv.flatten()))

    q0, k0, v0 = q, k, v
    new = [t[:, :, 10:] for t in (q, k, v)]
    assert_same_forward_backward(fused, reference, new, rtol=1e-9)


# (id, eps, masked, key length, keep_bytes): the reference's epsilon or none, key padding,
# cross attention over fewer keys, the feature tensors kept or formed again in backward
NONCAUSAL_CASES = [
    ("eps", 1e-4, False, 37, None),
    ("no-eps", 0.0, False, 37, None),
    ("eps-masked", 1e-4, True, 37, None),
    ("no-eps-masked-recomputed", 0.0, True, 37, 0),
    ("eps-cross-recomputed", 1e-4, False, 20, 0),
    ("eps-cross-masked", 1e-4, True, 20, None),
]


@pytest.mark.parametrize(
    "eps,masked,keys,keep", [c[1:] for c in NONCAUSAL_CASES], ids=[c[0] for c in NONCAUSAL_CASES]
)
def test_fused_noncausal_equals_the_feature_maps(eps, masked, keys, keep):
    """Forward and every gradient equal the feature maps then linear attention (the plain
    path), epsilon, padding, cross attention and both backward modes included; a fully masked
    row gives zeros."""
    proj = projection(24, 16).double()
    mask = None
    if masked:
        mask = torch.ones(2, keys, dtype=torch.bool)
        mask[0, :5] = False
        mask[1, :] = False  # no key at all: zeros
    options = {} if keep is None else {"keep_bytes": keep}

    def fused(q, k, v):
        return softmax_noncausal_attention(q, k, v, proj, mask=mask, eps=eps, **options)

    def plain(q, k, v):
        fq = softmax_query_features(q, proj, eps=eps)
        fk, _ = softmax_key_features(k, proj, causal=False, mask=mask, eps=eps)
        return linear_attention(fq, fk, v)

    gen = torch.Generator().manual_seed(keys)
    q = torch.randn(2, 3, 37, 16, generator=gen, dtype=torch.float64) * 2
    k, v = (torch.randn(2, 3, keys, 16, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    assert_same_forward_backward(fused, plain, [q, k, v], rtol=1e-9)
    if masked:
        assert torch.equal(fused(q, k, v)[1], torch.zeros_like(q[1]))


def test_fused_noncausal_large_inputs_and_half_precision():
    """Queries and keys of std 6 (log-features far apart): finite and equal to the float64
    maps; bfloat16 inputs are computed in float32 and returned in bfloat16."""
    proj = projection(32, 16)
    q, k, v = qkv(1, 2, 50, 16, seed=3, scale=6.0)
    got = softmax_noncausal_attention(q, k, v, proj, eps=1e-4)
    fq = softmax_query_features(q.double(), proj.double(), eps=1e-4)
    fk, _ = softmax_key_features(k.double(), proj.double(), causal=False, eps=1e-4)
    assert torch.isfinite(got).all()
    assert_close(got, linear_attention(fq, fk, v.double()).float(), 1e-4)
    half = softmax_noncausal_attention(*(t.bfloat16() for t in (q, k, v)), proj, eps=1e-4)
    assert half.dtype == torch.bfloat16
    full = softmax_noncausal_attention(*(t.bfloat16().float() for t in (q, k, v)), proj, eps=1e-4)
    assert_close(half.float(), full, 1e-2)


def test_fused_noncausal_bad_inputs_raise_before_work():
    proj = projection(8, 16)
    q, k, v = qkv(1, 2, 10, 16, seed=0)
    cases = [
        ((q[0], k, v, proj), {}, "q must be"),
        ((q, k, v[:, :, :7], proj), {}, "v must be"),
        ((q, k, v, proj[:, :8]), {}, "projection must be"),
        ((q, k, v, proj), {"eps": -1.0}, "eps must be"),
        ((q, k, v, proj), {"mask": torch.ones(1, 9, dtype=torch.bool)}, "mask must be"),
        ((q, k, v, proj), {"mask": torch.ones(1, 10)}, "mask must be"),
    ]
    for args, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            softmax_noncausal_attention(*args, **kw)


@pytest.mark.parametrize("form", ["default", "blocks"])
@pytest.mark.parametrize("chunks", [1, 7, 12, 64, 97])
def test_scan_block_sizes_equal_the_sequential_sums(chunks, form):
    """The default (on CPU chunk after chunk, in place) and the two-level form at its default
    block (a divisor of G near sqrt(G), or sqrt(G) with padding for a prime)."""
    block = None if form == "default" else _block_size(chunks)
    gen = torch.Generator().manual_seed(chunks)
    x = torch.randn(1, 2, chunks, 3, 2, generator=gen, dtype=torch.float64)
    init = torch.randn(1, 2, 3, 2, generator=gen, dtype=torch.float64)
    c_end = (torch.randn(1, 2, chunks, generator=gen, dtype=torch.float64) * 3).cummax(-1).values
    c_ref = torch.cat(((c_end[..., :1] - 1.0), c_end[..., :-1]), dim=-1)
    befores, final = scan_sums(x, c_ref, c_end, init, block)
    running, expected = init, []
    for g in range(chunks):
        expected.append(running)
        running = running * (c_ref[..., g] - c_end[..., g]).exp()[..., None, None] + x[:, :, g]
    assert_close(befores, torch.stack(expected, dim=2), 1e-12)
    assert_close(final, running, 1e-12)
    d_before, d_final = torch.randn_like(befores), torch.randn_like(final)
    x_leaf, init_leaf = x.clone().requires_grad_(), init.clone().requires_grad_()
    running, outs = init_leaf, []
    for g in range(chunks):
        outs.append(running)
        running = running * (c_ref[..., g] - c_end[..., g]).exp()[..., None, None] + x_leaf[:, :, g]
    want = torch.autograd.grad((torch.stack(outs, 2), running), (x_leaf, init_leaf), (d_before, d_final))
    got = scan_sums_backward(d_before, c_ref, c_end, d_final, block)
    assert_close(got[0], want[0], 1e-12)
    assert_close(got[1], want[1], 1e-12)


def test_chunked_causal_without_stabiliser_equals_naive():
    inputs = [t.exp() for t in qkv(1, 3, 45, 8, seed=3)[:2]] + qkv(1, 3, 45, 8, seed=4)[:1]

    def run(backend):
        return lambda q, k, v: causal_linear_attention(q, k, v, chunk_size=10, backend=backend)[0]

    assert_same_forward_backward(run("chunk"), run("naive"), inputs)


def test_chunked_causal_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 1, 8, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    scale = torch.randn(1, 1, 8, generator=gen, dtype=torch.float64).cummax(-1).values

    def fn(q, k, v):
        return chunk_causal_linear_attention(q.exp(), k.exp(), v, log_scale=scale, chunk_size=3)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_scan_blocks_equal_sequential_recurrence_and_backward():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 9, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    init = torch.randn(2, 1, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    c_end = (torch.randn(2, 1, 9, generator=gen, dtype=torch.float64) * 3).cummax(-1).values
    c0 = c_end[..., 0] - 1.0
    c_ref = torch.cat((c0[..., None], c_end[..., :-1]), dim=-1)
    befores, final = scan_sums(x, c_ref, c_end, init, block=4)
    running, expected = init, []
    for g in range(9):
        expected.append(running)
        running = running * (c_ref[..., g] - c_end[..., g]).exp()[..., None, None] + x[:, :, g]
    assert_close(befores, torch.stack(expected, dim=2), 1e-12)
    assert_close(final, running, 1e-12)
    d_before, d_final = torch.randn_like(befores), torch.randn_like(final)
    want = torch.autograd.grad((befores, final), (x, init), (d_before, d_final))
    got = scan_sums_backward(d_before, c_ref, c_end, d_final, block=2)
    assert_close(got[0], want[0], 1e-12)
    assert_close(got[1], want[1], 1e-12)


def test_stabilised_features_equal_the_exact_kernel():
    """exp(w q' - |q'|^2/2) exp(w k' - |k'|^2/2) computed without any stabiliser in float64."""
    q, k, v = qkv(1, 2, 50, 16, seed=7)
    proj = projection(32, 16)
    out = softmax_causal(16, proj)(q, k, v)

    def raw(x):
        x = x.double() * 16**-0.25
        return torch.exp(x @ proj.double().T - x.square().sum(-1, keepdim=True) / 2)

    exact = linear_attention_naive(raw(q), raw(k), v.double(), causal=True)
    assert_close(out, exact, 1e-5)


@pytest.mark.parametrize("where", [5, 31], ids=["early", "late"])
def test_outputs_never_depend_on_later_keys(where):
    """A huge later key (one that would dominate a sequence-wide stabiliser) leaves every
    earlier output bit for bit unchanged, while the reference-style global max does not."""
    q, k, v = qkv(1, 2, 40, 16, seed=11)
    proj = projection(32, 16)
    fn = softmax_causal(8, proj)
    base = fn(q, k, v)
    k2 = k.clone()
    k2[..., where, :] = proj[0] * 3.0  # aligned with a feature: a very large log-feature
    moved = fn(q, k2, v)
    assert torch.equal(base[..., :where, :], moved[..., :where, :])
    assert not torch.allclose(base[..., where:, :], moved[..., where:, :])


def test_half_precision_with_extreme_keys_stays_finite():
    q, k, v = qkv(2, 2, 70, 16, seed=5, scale=6.0)
    proj = projection(32, 16)
    reference = softmax_causal(16, proj)(q.double(), k.double(), v.double())
    for dtype in (torch.bfloat16, torch.float16):
        out = softmax_causal(16, proj)(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert relative_error(out, reference) < 0.05


def test_padding_removes_keys_from_numerator_and_normaliser():
    q, k, v = qkv(2, 2, 30, 16, seed=9)
    proj = projection(32, 16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    mask[1, ::3] = False
    for causal in (False, True):
        fq = softmax_query_features(q, proj)
        fk, scale = softmax_key_features(k, proj, causal=causal, mask=mask)
        if causal:
            out = chunk_causal_linear_attention(fq, fk, v, log_scale=scale, chunk_size=8)[0]
        else:
            out = linear_attention(fq, fk, v)
        for b in range(2):
            kept = mask[b].nonzero()[:, 0]
            fq_b = softmax_query_features(q[b : b + 1], proj)
            fk_b, _ = softmax_key_features(k[b : b + 1, :, kept], proj, causal=False)
            if causal:
                # query t sees the kept keys at positions <= t
                for t in (4, 17, 29):
                    seen = kept[kept <= t]
                    fk_t, _ = softmax_key_features(k[b : b + 1, :, seen], proj, causal=False)
                    want = linear_attention(fq_b[:, :, t : t + 1], fk_t, v[b : b + 1, :, seen])
                    assert_close(out[b : b + 1, :, t : t + 1], want, 1e-5)
            else:
                want = linear_attention(fq_b, fk_b, v[b : b + 1, :, kept])
                assert_close(out[b : b + 1], want, 1e-5)


def test_fully_masked_rows_give_zeros():
    q, k, v = qkv(1, 1, 12, 8, seed=2)
    proj = projection(16, 8)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 6:] = True
    fq = softmax_query_features(q, proj)
    fk, scale = softmax_key_features(k, proj, causal=True, mask=mask)
    out = chunk_causal_linear_attention(fq, fk, v, log_scale=scale, chunk_size=4)[0]
    assert torch.isfinite(out).all() and out[..., :6, :].abs().max() == 0
    fk, _ = softmax_key_features(k, proj, causal=False, mask=torch.zeros(1, 12, dtype=torch.bool))
    assert linear_attention(fq, fk, v).abs().max() == 0


@pytest.mark.parametrize("kind", ["softmax", "generalized", "no_projection"])
def test_decoding_steps_equal_the_chunked_pass(kind):
    q, k, v = qkv(2, 2, 23, 8, seed=13)
    proj = projection(16, 8)

    def features(q, k, running=None):
        if kind == "softmax":
            fk, scale = softmax_key_features(k, proj, causal=True, initial_log_scale=running)
            return softmax_query_features(q, proj), fk, scale
        if kind == "generalized":
            make = dict(kernel_fn=torch.relu, eps=1e-3)
            return generalized_features(q, proj, **make), generalized_features(k, proj, **make), None
        return no_projection_features(q, k, causal=True, initial_log_scale=running)

    fq, fk, scale = features(q, k)
    full, _ = chunk_causal_linear_attention(fq, fk, v, log_scale=scale, chunk_size=5)
    # a prefix in chunks, then one step per position
    fq, fk, scale = features(q[:, :, :9], k[:, :, :9])
    first, state = chunk_causal_linear_attention(fq, fk, v[:, :, :9], log_scale=scale, chunk_size=4)
    outs = [first]
    for t in range(9, 23):
        fq, fk, scale = features(q[:, :, t : t + 1], k[:, :, t : t + 1], state.log_scale)
        out, state = causal_linear_attention_step(fq, fk, v[:, :, t : t + 1], state, log_scale=scale)
        outs.append(out)
    assert_close(torch.cat(outs, dim=2), full, 1e-5)
    empty = FavorState.empty(2, 2, fq.shape[-1], 8, q)
    assert empty.kv.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_decoding_step_equals_the_feature_maps_and_the_step(dtype):
    # softmax_causal_step against its reference: the two feature maps then the generic step,
    # from an empty state (the first key sets the stabiliser) and after a prefix, with keys
    # scaled up so that the stabiliser moves
    q, k, v = qkv(2, 3, 12, 8, seed=21, dtype=dtype, scale=2.0)
    proj = projection(20, 8)
    fast = ref = FavorState.empty(2, 3, 20, 8, q)
    for t in range(12):
        step = [x[:, :, t : t + 1] for x in (q, k, v)]
        out, fast = softmax_causal_step(*step, proj, fast)
        fq = softmax_query_features(step[0], proj)
        fk, scale = softmax_key_features(step[1], proj, causal=True, initial_log_scale=ref.log_scale)
        expected, ref = causal_linear_attention_step(fq, fk, step[2], ref, log_scale=scale)
        assert out.dtype == dtype
        assert_close(out.float(), expected.float(), 1e-6 if dtype == torch.float32 else 1e-2)
        assert_close(fast.kv, ref.kv, 1e-6)
        assert_close(fast.log_scale, ref.log_scale, 1e-6)
    full, _ = softmax_causal_attention(q, k, v, proj)
    assert_close(out.float(), full[:, :, -1:].float(), 1e-5 if dtype == torch.float32 else 1e-2)


def test_fused_decoding_step_leaves_its_state_and_refuses_bad_shapes():
    q, k, v = qkv(1, 2, 1, 8, seed=3)
    proj = projection(12, 8)
    _, state = softmax_causal_attention(*qkv(1, 2, 5, 8, seed=4), proj)
    before = state.kv.clone(), state.log_scale.clone()
    softmax_causal_step(q, k, v, proj, state)
    assert torch.equal(state.kv, before[0]) and torch.equal(state.log_scale, before[1])
    with pytest.raises(ValueError, match=r"\[B, H, 1, D\]"):
        softmax_causal_step(*qkv(1, 2, 2, 8, seed=5), proj, state)
    with pytest.raises(ValueError, match="projection must be"):
        softmax_causal_step(q, k, v, projection(12, 4), state)
    with pytest.raises(ValueError, match="state must hold"):
        softmax_causal_step(q, k, v, projection(16, 8), state)


def test_orthogonal_rows_and_scalings():
    w = projection(40, 16, scaling=1)
    assert_close(w.norm(dim=1), torch.full((40,), 4.0), 1e-5)
    block = w[:16] / 4.0
    assert_close(block @ block.T, torch.eye(16), 1e-5)
    chi = projection(40, 16, scaling=0)
    assert not torch.allclose(chi.norm(dim=1), torch.full((40,), 4.0))
    with pytest.raises(ValueError, match="scaling"):
        gaussian_orthogonal_random_matrix(8, 4, scaling=2)


def favor_error(nb_features, *, orthogonal, seeds=12, n=64, d=16):
    """Mean relative error of non-causal FAVOR+ against exact softmax attention."""
    errors = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(1000 + seed)
        q, k, v = (torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64) * 0.7 for _ in range(3))
        exact = dense_attention_naive(q, k, v, scale=d**-0.5)
        w = projection(nb_features, d, seed=seed, orthogonal=orthogonal).double()
        fq = softmax_query_features(q, w)
        fk, _ = softmax_key_features(k, w, causal=False)
        errors.append(relative_error(linear_attention(fq, fk, v), exact))
    return sum(errors) / len(errors)


def test_favor_error_falls_with_features_and_orthogonal_beats_iid():
    """The Performer paper's approximation experiment, reduced: 16 -> 64 -> 256 features."""
    ortho = [favor_error(m, orthogonal=True) for m in (16, 64, 256)]
    iid = [favor_error(m, orthogonal=False) for m in (16, 64, 256)]
    assert ortho[0] > ortho[1] > ortho[2]
    assert iid[0] > iid[1] > iid[2]
    assert all(o < i for o, i in zip(ortho, iid))
    # it keeps shrinking (towards 1 / sqrt(M) for many features)
    assert ortho[2] < ortho[0] / 1.5


def test_bad_inputs_raise_before_work():
    q, k, v = qkv(1, 1, 8, 4, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_causal_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="log_scale"):
        chunk_causal_linear_attention(q, k, v, log_scale=torch.zeros(1, 1, 7))
    with pytest.raises(ValueError, match="eps must be 0"):
        softmax_key_features(k, projection(8, 4), causal=True, eps=1e-4)
    with pytest.raises(ValueError, match="mask"):
        softmax_key_features(k, projection(8, 4), causal=False, mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match="backend"):
        causal_linear_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="projection"):
        softmax_query_features(q, projection(8, 6))
    assert math.isfinite(favor_error(8, orthogonal=True, seeds=1, n=8, d=4))


def _chunked_fn(proj):
    def fn(q, k, v):
        fq = softmax_query_features(q, proj)
        fk, scale = softmax_key_features(k, proj, causal=True)
        return chunk_causal_linear_attention(fq, fk, v, log_scale=scale, chunk_size=8)[0]

    return fn


AUTOCAST_OPS = {
    "fused-causal": lambda proj: lambda q, k, v: softmax_causal_attention(q, k, v, proj, chunk_size=8)[0],
    "fused-noncausal": lambda proj: lambda q, k, v: softmax_noncausal_attention(q, k, v, proj, eps=1e-4),
    "chunked": _chunked_fn,
}


@pytest.mark.parametrize(
    "name, backward_inside",
    [(name, False) for name in AUTOCAST_OPS] + [("fused-causal", True), ("fused-noncausal", True)],
)
def test_autocast_leaves_the_float32_ops_unchanged(name, backward_inside):
    """The ops compute in float32 by design. Under bfloat16 autocast (the trainer's --precision
    bf16, the default on CUDA) they give the very same output and gradients as without it:
    the products autocast cast to bfloat16 used to be saved for a backward pass that then
    failed on mixed dtypes (and the chunked form's feature maps took their exponents from
    bfloat16 products). The fused ops' own backward passes stay in float32 even when backward
    itself runs under autocast (torch's own backward formulas, such as the feature maps'
    projection in the chunked form, do follow autocast there)."""
    fn = AUTOCAST_OPS[name](projection(24, 16))
    inputs = qkv(2, 2, 37, 16, seed=4, dtype=torch.bfloat16)  # as autocast's projections give them

    def run(autocast):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*leaves)
            loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return out, [t.grad for t in leaves]

    (want, want_grads), (got, got_grads) = run(False), run(True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g is not None and torch.equal(g, w)


@pytest.mark.parametrize("shape", [(2, 2, 0, 4), (0, 2, 5, 4)], ids=["len0", "batch0"])
def test_chunk_causal_takes_no_positions_or_no_batch(shape):
    q = torch.rand(*shape, requires_grad=True)
    v = torch.randn(*shape[:-1], 3, requires_grad=True)
    out, state = chunk_causal_linear_attention(q, q, v, chunk_size=2)
    assert out.shape == (*shape[:-1], 3) and state.kv.shape == (*shape[:2], 4, 4)
    out.sum().backward()
    assert v.grad.shape == v.shape


def test_chunk_causal_empty_segment_keeps_the_state():
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(2, 2, 5, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64)
    full, _ = chunk_causal_linear_attention(q, q, v, chunk_size=2)
    first, state = chunk_causal_linear_attention(q[:, :, :3], q[:, :, :3], v[:, :, :3], chunk_size=2)
    _, state = chunk_causal_linear_attention(q[:, :, :0], q[:, :, :0], v[:, :, :0], state=state)
    rest, _ = chunk_causal_linear_attention(q[:, :, 3:], q[:, :, 3:], v[:, :, 3:], state=state)
    assert_close(torch.cat((first, rest), dim=2), full)


def test_chunk_causal_refuses_integer_inputs():
    """Integer values were computed in float32 and cast back to integers (truncated)."""
    q = torch.ones(1, 1, 4, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="v must be a floating"):
        chunk_causal_linear_attention(q.float(), q.float(), q)
    with pytest.raises(TypeError, match="q must be a floating"):
        chunk_causal_linear_attention(q, q, q.float())
