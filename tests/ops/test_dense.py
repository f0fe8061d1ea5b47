"""ops/dense: the SDPA path equals the naive score-matrix path, forward and every input gradient,
and a query with no key gets zeros (never NaN) in every float dtype."""

from __future__ import annotations

import pytest
import torch

from longrange.ops.dense import (
    dense_attention,
    dense_attention_naive,
    dense_attention_sdpa,
    merge_masks,
)
from longrange.ops.dense.masks import causal_mask
from longrange.testing import assert_close, assert_same_forward_backward

LOW_PRECISION = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def make_inputs(batch, heads, n, m, dim, *, seed, dtype=torch.float32, value_dim=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, heads, m, dim), (batch, heads, m, value_dim or dim)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def key_padding(batch, m, *, seed, keep=0.7):
    """[B, 1, 1, M] mask with about ``keep`` of the keys kept and at least one per row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, m, generator=gen) < keep
    mask[:, 0] = True
    return mask[:, None, None, :]


# (id, batch, heads, n queries, m keys, head dim, causal, padding mask, bias)
CASES = [
    ("plain-63", 2, 2, 63, 63, 16, False, False, False),
    ("padding-63", 2, 2, 63, 63, 16, False, True, False),
    ("causal-63", 2, 2, 63, 63, 16, True, False, False),
    ("causal-padding-501", 1, 2, 501, 501, 8, True, True, False),
    ("causal-offset-37-of-100", 2, 2, 37, 100, 16, True, False, False),
    ("causal-offset-padding-1-of-63", 2, 3, 1, 63, 16, True, True, False),
    ("causal-one-query-of-50", 2, 3, 1, 50, 16, True, False, False),  # a step of decoding: no mask
    ("causal-one-query-of-1", 1, 2, 1, 1, 16, True, False, False),
    ("bias-63", 2, 2, 63, 63, 16, False, False, True),
    ("bias-causal-padding-offset-45-of-77", 2, 2, 45, 77, 16, True, True, True),
    ("value-width-differs", 1, 2, 33, 65, 16, False, True, False),
]


@pytest.mark.parametrize(
    "batch, heads, n, m, dim, causal, padded, biased", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_sdpa_matches_naive(batch, heads, n, m, dim, causal, padded, biased):
    q, k, v = make_inputs(batch, heads, n, m, dim, seed=n + m, value_dim=dim + 8 * (n == 33))
    mask = key_padding(batch, m, seed=m) if padded else None
    inputs = [q, k, v]
    if biased:
        gen = torch.Generator().manual_seed(7)
        inputs.append(torch.randn(1, heads, n, m, generator=gen))  # a learned relative bias

    def run(fn):
        def call(q, k, v, bias=None):
            return fn(q, k, v, mask=mask, causal=causal, bias=bias)

        return call

    assert_same_forward_backward(run(dense_attention_sdpa), run(dense_attention_naive), inputs, rtol=1e-4)


def test_causal_offset_aligns_queries_with_last_keys():
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 4), expected)
    # More queries than keys: the first queries have no key at all.
    assert not causal_mask(3, 2)[0].any()


def test_causal_offset_equals_slice_of_full_causal():
    q, k, v = make_inputs(1, 2, 40, 40, 16, seed=3)
    full = dense_attention(q, k, v, causal=True)
    tail = dense_attention(q[:, :, -9:], k, v, causal=True)
    assert_close(tail, full[:, :, -9:])


def test_merge_masks_rules():
    assert merge_masks(None, False, 3, 5, torch.device("cpu")) is None
    padding = torch.tensor([True, False, True, True, True])
    merged = merge_masks(padding, True, 3, 5, torch.device("cpu"))
    assert torch.equal(merged, causal_mask(3, 5) & padding)
    with pytest.raises(TypeError, match="mask"):
        merge_masks(padding.float(), False, 3, 5, torch.device("cpu"))


def fully_masked_setup(dtype):
    """Padding masks with one batch row entirely masked and, in the other, query rows whose
    keys are all masked; returns inputs, mask [B, 1, N, M] and the empty rows [B, 1, N, 1]."""
    q, k, v = make_inputs(2, 2, 31, 47, 16, seed=11, dtype=dtype)
    mask = key_padding(2, 47, seed=5).expand(2, 1, 31, 47).clone()
    mask[0] = False
    mask[1, :, 4:9] = False
    empty = ~mask.any(dim=-1, keepdim=True)
    return (q, k, v), mask, empty


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["sdpa", "naive"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(dtype, backend, with_bias):
    (q, k, v), mask, empty = fully_masked_setup(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias = torch.randn(1, 2, 31, 47).to(dtype) if with_bias else None
    out = dense_attention(*leaves, mask=mask, bias=bias, backend=backend)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out.masked_select(empty) == 0).all()
    assert out.masked_select(~empty).abs().sum() > 0
    out.float().square().sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert (leaves[0].grad.masked_select(empty) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=lambda d: str(d).removeprefix("torch."))
def test_low_precision_sdpa_matches_naive_with_empty_rows(dtype):
    (q, k, v), mask, _ = fully_masked_setup(dtype)
    assert_same_forward_backward(
        lambda q, k, v: dense_attention_sdpa(q, k, v, mask=mask),
        lambda q, k, v: dense_attention_naive(q, k, v, mask=mask),
        [q, k, v],
        rtol=LOW_PRECISION[dtype],
    )


def test_causal_with_more_queries_than_keys_zeroes_the_first_rows():
    q, k, v = make_inputs(1, 1, 6, 4, 8, seed=2)
    for backend in BACKENDS:
        out = dense_attention(q, k, v, causal=True, backend=backend)
        assert (out[:, :, :2] == 0).all()
        assert torch.isfinite(out).all()


def test_dropout_zero_is_deterministic_and_dropout_changes_output():
    q, k, v = make_inputs(1, 2, 20, 20, 8, seed=4)
    mask = key_padding(1, 20, seed=1)
    base = dense_attention(q, k, v, mask=mask)
    assert_close(dense_attention(q, k, v, mask=mask, dropout=0.0), base)
    torch.manual_seed(0)
    dropped = dense_attention(q, k, v, mask=mask, dropout=0.5)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, base)


def test_bad_arguments_are_named():
    q, k, v = make_inputs(1, 1, 4, 4, 8, seed=0)
    with pytest.raises(ValueError, match="backend"):
        dense_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="dropout"):
        dense_attention(q, k, v, dropout=0.1, backend="naive")
    with pytest.raises(TypeError, match="mask"):
        dense_attention(q, k, v, mask=torch.ones(4, 4))


def test_many_small_problems_take_the_matmul_path_and_equal_naive(monkeypatch):
    """Buckets of at most 64 queries against at most 256 keys (float32 / float64, CPU, scores
    under the byte limit) run as matmul, softmax, matmul: forward and gradients equal the
    naive path; larger tiles, half precision or too many scores keep the flash kernel."""
    from longrange.ops.dense import sdpa

    q, k, v = make_inputs(2, 16, 64, 192, 16, seed=3)
    assert sdpa._small_tiles(q, k)
    assert_same_forward_backward(dense_attention_sdpa, dense_attention_naive, [q, k, v], rtol=1e-5)
    for queries, keys in ((65, 192), (64, 257)):
        big_q, big_k, _ = make_inputs(1, 2, queries, keys, 16, seed=4)
        assert not sdpa._small_tiles(big_q, big_k)
    assert not sdpa._small_tiles(q.bfloat16(), k.bfloat16())
    monkeypatch.setattr(sdpa, "SMALL_SCORE_BYTES", 2 * 16 * 64 * 192 * 4 - 1)
    assert not sdpa._small_tiles(q, k)
    calls = []
    monkeypatch.setattr(sdpa, "small_tile_attention", lambda *a, **kw: calls.append(1))
    dense_attention_sdpa(q, k, v)
    assert calls == []  # over the limit: the flash path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change, error, name",
    [
        (dict(q=torch.ones(1, 2, 4, 8, dtype=torch.long)), TypeError, "q must be a floating"),
        (dict(k=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(q=torch.zeros(2, 4, 8)), ValueError, "q must be 4-D"),
        (dict(k=torch.zeros(1, 2, 4, 6)), ValueError, "must agree"),
        (dict(v=torch.zeros(1, 2, 3, 8)), ValueError, "must agree"),
        (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "mask must broadcast"),
        (dict(mask=torch.ones(1, 1, 1, 3, dtype=torch.bool)), ValueError, "mask must broadcast"),
        (dict(bias=torch.zeros(3, 4, 4)), ValueError, "bias must broadcast"),
        (dict(bias=torch.zeros(2, 4, 4, dtype=torch.long)), TypeError, "bias must be a floating"),
        (dict(dropout=float("nan")), ValueError, "dropout"),
        (dict(dropout=1.5), ValueError, "dropout"),
    ],
    ids=[
        "int-q",
        "mixed-dtypes",
        "3d-q",
        "k-width",
        "v-length",
        "mask-3-rows",
        "mask-wrong-m",
        "bias-heads",
        "int-bias",
        "nan-dropout",
        "dropout-above-1",
    ],
)
def test_wrong_inputs_are_refused_by_name_before_any_work(backend, change, error, name):
    """Both backends refuse the same wrong arguments; a NaN dropout was taken as no dropout."""
    q, k, v = make_inputs(1, 2, 4, 4, 8, seed=0)
    with pytest.raises(error, match=name):
        dense_attention(**(dict(q=q, k=k, v=v) | change), backend=backend)


def test_naive_keeps_float64_inputs_in_float64():
    """The reference worked in float32 whatever the input, so a float64 comparison with it
    could not see errors below 1e-7."""
    q, k, v = make_inputs(2, 2, 9, 9, 8, seed=3, dtype=torch.float64)
    bias = torch.randn(2, 9, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scores = (q @ k.transpose(-1, -2)) * 8**-0.5 + bias
    scores = scores.masked_fill(~causal_mask(9, 9), float("-inf"))
    expected = scores.softmax(dim=-1) @ v
    out = dense_attention_naive(q, k, v, causal=True, bias=bias)
    assert out.dtype == torch.float64
    assert (out - expected).abs().max() < 1e-12


def test_mixed_dtypes_are_taken_under_autocast():
    # a bfloat16 query against float32 keys and values (a decoding step's float32 KV cache):
    # refused by the argument check without autocast, computed as autocast casts them with it
    q, k, v = make_inputs(1, 2, 1, 9, 16, seed=4)
    with pytest.raises(TypeError, match="share one dtype"):
        dense_attention(q.bfloat16(), k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dense_attention(q.bfloat16(), k, v, causal=True)
        same = dense_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert torch.equal(mixed, same)


@pytest.mark.parametrize("causal", [False, True], ids=["padding", "padding-causal"])
def test_masked_attention_runs_on_the_meta_device(causal):
    """Shapes only (a model built on the meta device): the check for rows with no key read a
    value ("Tensor.item() cannot be called on meta tensors"); on meta they are opened
    unconditionally, as in a compiled graph."""
    q = torch.empty(2, 2, 5, 4, device="meta")
    v = torch.empty(2, 2, 7, 3, device="meta")
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool, device="meta")
    out = dense_attention(q, torch.empty(2, 2, 7, 4, device="meta"), v, mask=mask, causal=causal)
    assert out.shape == (2, 2, 5, 3) and out.device.type == "meta"
