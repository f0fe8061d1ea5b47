"""ops/local: the blocked SDPA path (and FlexAttention where it runs) equals the dense band-mask
reference, forward and every input gradient; decoding steps equal the full pass."""

from __future__ import annotations

import warnings

import pytest
import torch

from longrange.modules.rotary import RotaryEmbedding
from longrange.ops.local import (
    local_attention,
    local_attention_blocked,
    local_attention_naive,
    local_attention_step,
    local_cache_length,
    resolve_backend,
    window_bounds,
)
from longrange.testing import assert_close, assert_same_forward_backward


def make_qkv(batch, heads, n, dim, *, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=gen).to(dtype) for _ in range(3)]


def key_padding(batch, n, *, seed, keep=0.75):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, generator=gen) < keep


def compare(options, *, n=63, batch=2, heads=2, dim=16, seed=0, mask=None, bias=None):
    """blocked vs naive on seeded inputs, forward and gradients of q, k, v (and bias)."""
    inputs = make_qkv(batch, heads, n, dim, seed=seed)
    if bias is not None:
        inputs.append(bias)

    def run(fn):
        return lambda q, k, v, b=None: fn(q, k, v, mask=mask, bias=b, **options)

    assert_same_forward_backward(run(local_attention_blocked), run(local_attention_naive), inputs)


GEOMETRIES = [(False, lb, lf) for lb in range(3) for lf in range(3)] + [(True, lb, 0) for lb in range(3)]


def geometry_id(g):
    return f"{'causal' if g[0] else 'bidir'}-back{g[1]}-fwd{g[2]}"


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
@pytest.mark.parametrize("n", [63, 64], ids=["n63-autopad", "n64"])
def test_blocked_matches_naive_geometry(geometry, n):
    causal, back, fwd = geometry
    options = dict(window_size=8, causal=causal, look_backward=back, look_forward=fwd)
    compare(options, n=n, seed=n + back, mask=key_padding(2, n, seed=back) if n == 63 else None)


OPTION_CASES = [
    ("shared-qk-bidir", dict(shared_qk=True), True),
    ("shared-qk-causal", dict(shared_qk=True, causal=True, look_forward=0), True),
    ("shared-qk-window2-alone", dict(shared_qk=True, window_size=2, look_backward=0), True),
    ("exact-bidir", dict(exact_windowsize=True, look_forward=2), True),
    ("exact-causal-back2", dict(exact_windowsize=True, causal=True, look_backward=2), True),
    ("exact-shared-causal", dict(exact_windowsize=True, shared_qk=True, causal=True), True),
    ("window-longer-than-seq", dict(window_size=100, causal=True), True),
    ("scale", dict(scale=0.3, causal=True), False),
]


@pytest.mark.parametrize("extra, padded", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_blocked_matches_naive_options(extra, padded):
    options = dict(window_size=8, look_backward=1)
    options.update(extra)
    n = 61
    compare(options, n=n, seed=3, mask=key_padding(2, n, seed=9) if padded else None)


def test_odd_length_500_causal():
    options = dict(window_size=32, causal=True, look_backward=1)
    compare(options, n=500, batch=1, heads=2, dim=8, seed=5, mask=key_padding(1, 500, seed=2))


def test_per_head_mask():
    mask = key_padding(2, 45, seed=4).unsqueeze(1).repeat(1, 3, 1)
    mask[:, 1, ::2] = False
    compare(dict(window_size=8, look_forward=1), n=45, heads=3, seed=6, mask=mask)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_window_bias_matches_naive_with_gradient(causal):
    back, fwd = 1, 0 if causal else 1
    span = (back + 1 + fwd) * 8
    bias = torch.randn(2, 8, span, generator=torch.Generator().manual_seed(1))
    options = dict(window_size=8, causal=causal, look_backward=back, look_forward=fwd)
    compare(options, n=50, seed=8, mask=key_padding(2, 50, seed=3), bias=bias)


@pytest.mark.parametrize("xpos", [False, True], ids=["rotary", "xpos"])
def test_rotary_positions_inside_spans_match_naive(xpos):
    rot = RotaryEmbedding(16, xpos_scale_base=4.0 if xpos else None)
    options = dict(window_size=8, look_backward=1, look_forward=1)
    compare(dict(options, rotary=rot.rotate_queries_and_keys), n=40, seed=12)


def test_fully_masked_windows_give_zeros_in_every_dtype():
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 8:24] = False  # with look_backward=0 the windows 8..15 and 16..23 keep no key
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)):
        q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 40, 16, seed=1, dtype=dtype))
        options = dict(window_size=8, look_backward=0, look_forward=0, mask=mask)
        out = local_attention(q, k, v, backend="blocked", **options)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out[0, :, 8:24] == 0).all() and out[1].abs().sum() > 0
        out.float().square().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        reference = local_attention_naive(q.float(), k.float(), v.float(), **options)
        assert_close(out.float(), reference, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_causal_matches_float32_reference(dtype):
    q, k, v = make_qkv(1, 2, 77, 16, seed=2, dtype=dtype)
    options = dict(window_size=16, causal=True, mask=key_padding(1, 77, seed=1), shared_qk=True)
    out = local_attention(q, k, v, **options)
    assert out.dtype == dtype and torch.isfinite(out).all()
    reference = local_attention_naive(q.float(), k.float(), v.float(), **options)
    assert_close(out.float(), reference, rtol=3e-2)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padding_never_changes_kept_positions(causal):
    """Length 37 computed directly equals length 48 with the 11 extra keys masked."""
    q, k, v = make_qkv(1, 2, 48, 16, seed=4)
    mask = torch.ones(1, 48, dtype=torch.bool)
    mask[:, 37:] = False
    options = dict(window_size=8, causal=causal, look_backward=1)
    short = local_attention(q[:, :, :37], k[:, :, :37], v[:, :, :37], **options)
    long = local_attention(q, k, v, mask=mask, **options)
    assert_close(short, long[:, :, :37])


def test_window_bounds_are_the_band():
    pos = torch.arange(12)
    lo, hi = window_bounds(
        pos,
        window_size=4,
        look_backward=1,
        look_forward=1,
        causal=False,
        exact_windowsize=False,
        seq_len=10,
    )
    assert lo.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4]
    assert hi.tolist() == [7, 7, 7, 7, 9, 9, 9, 9, 9, 9, 9, 9]


def decode_all(q, k, v, *, mask=None, rotary=None, **options):
    """Run every position through local_attention_step with a cache of the last keys."""
    n, keep = (
        q.shape[-2],
        local_cache_length(window_size=options["window_size"], look_backward=options["look_backward"]),
    )
    rows = []
    for p in range(n):
        start = max(0, p + 1 - keep)
        step_mask = None if mask is None else mask[:, start : p + 1]
        rows.append(
            local_attention_step(
                q[:, :, p : p + 1],
                k[:, :, start : p + 1],
                v[:, :, start : p + 1],
                position=p,
                mask=step_mask,
                rotary=rotary,
                **options,
            )
        )
    return torch.cat(rows, dim=-2)


DECODE_CASES = [
    ("back1", dict(look_backward=1), False, None),
    ("back2-exact", dict(look_backward=2, exact_windowsize=True), False, None),
    ("back0-shared-qk-padding", dict(look_backward=0, shared_qk=True), True, None),
    ("back1-rotary-padding", dict(look_backward=1), True, RotaryEmbedding(16)),
    ("back1-xpos", dict(look_backward=1), False, RotaryEmbedding(16, xpos_scale_base=4.0)),
]


@pytest.mark.parametrize(
    "options, padded, rot", [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES]
)
def test_decode_steps_equal_full_pass(options, padded, rot):
    q, k, v = make_qkv(2, 2, 29, 16, seed=21)
    mask = key_padding(2, 29, seed=6) if padded else None
    rotary = rot.rotate_queries_and_keys if rot is not None else None
    options = dict(options, window_size=8)
    full = local_attention(q, k, v, causal=True, mask=mask, rotary=rotary, **options)
    assert_close(decode_all(q, k, v, mask=mask, rotary=rotary, **options), full)


def test_decode_with_bias_equals_full_pass():
    q, k, v = make_qkv(1, 2, 19, 16, seed=2)
    bias = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    options = dict(window_size=4, look_backward=1)
    full = local_attention(q, k, v, causal=True, bias=bias, **options)
    rows = [
        local_attention_step(
            q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], position=p, bias=bias, **options
        )
        for p in range(19)
    ]
    assert_close(torch.cat(rows, dim=-2), full)


def test_flex_matches_naive_forward():
    """Unfused FlexAttention checks the block mask on any device (no CPU backward in torch)."""
    flex = pytest.importorskip("longrange.ops.local.flex")
    q, k, v = make_qkv(2, 2, 45, 16, seed=13)
    mask = key_padding(2, 45, seed=8)
    mask[0, :20] = False
    cases = [
        dict(causal=False, look_backward=1, look_forward=1, shared_qk=True),
        dict(causal=True, look_backward=2, look_forward=0, exact_windowsize=True, shared_qk=True),
        dict(causal=False, look_backward=0, look_forward=2, exact_windowsize=True),
    ]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for extra in cases:
            span = (extra["look_backward"] + 1 + extra["look_forward"]) * 8
            bias = torch.randn(2, 8, span, generator=torch.Generator().manual_seed(span))
            options = dict(window_size=8, mask=mask, bias=bias, **extra)
            expected = local_attention_naive(q, k, v, **options)
            assert_close(flex.local_attention_flex(q, k, v, compiled=False, **options), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention runs on CUDA")
def test_compiled_flex_matches_naive_on_cuda():
    q, k, v = (t.cuda() for t in make_qkv(1, 2, 300, 64, seed=1))
    mask = key_padding(1, 300, seed=1).cuda()
    options = dict(window_size=64, causal=True, look_backward=1, mask=mask, shared_qk=True)
    assert_same_forward_backward(
        lambda q, k, v: local_attention(q, k, v, backend="flex", **options),
        lambda q, k, v: local_attention(q, k, v, backend="naive", **options),
        [q, k, v],
        rtol=1e-3,
    )


def test_auto_backend_and_dropout():
    q, k, v = make_qkv(1, 2, 24, 8, seed=0)
    assert resolve_backend("auto", q, dropout=0.0, rotary=None, bias=None) == "blocked"
    options = dict(window_size=8, causal=True)
    base = local_attention(q, k, v, **options)
    assert_close(local_attention(q, k, v, dropout=0.0, **options), base)
    torch.manual_seed(0)
    dropped = local_attention(q, k, v, dropout=0.5, **options)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, base)


BAD_ARGUMENTS = [
    ("window_size", dict(window_size=0), ValueError),
    ("look_backward", dict(look_backward=-1), ValueError),
    ("look_forward", dict(causal=True, look_forward=1), ValueError),
    ("dropout", dict(dropout=1.5), ValueError),
    ("backend", dict(backend="triton"), ValueError),
    ("dropout", dict(dropout=0.1, backend="naive"), ValueError),
    ("mask", dict(mask=torch.ones(1, 24)), TypeError),
    ("mask", dict(mask=torch.ones(1, 23, dtype=torch.bool)), ValueError),
    ("bias", dict(bias=torch.zeros(2, 8, 7)), ValueError),
]


@pytest.mark.parametrize("word, kwargs, error", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_are_named(word, kwargs, error):
    q, k, v = make_qkv(1, 2, 24, 8, seed=0)
    kwargs = {"window_size": 8, **kwargs}
    with pytest.raises(error, match=word):
        local_attention(q, k, v, **kwargs)
    with pytest.raises(TypeError, match="q"):
        local_attention(q.long(), k, v, window_size=8)


@pytest.mark.parametrize("masked", [False, True], ids=["length-5", "padding-mask"])
def test_blocked_runs_on_the_meta_device(masked):
    """Shapes only: the check for rows with no key read a value, which the meta device has not."""
    q = torch.empty(2, 2, 5, 4, device="meta")
    v = torch.empty(2, 2, 5, 3, device="meta")
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta") if masked else None
    out = local_attention(q, q, v, window_size=2, mask=mask, backend="blocked")
    assert out.shape == (2, 2, 5, 3) and out.device.type == "meta"
