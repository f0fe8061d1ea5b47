"""ops/numerics: the exponentials keep their results normal (or exactly zero where masked)
and equal exp everywhere else; the denormal mode reaches every thread of torch's pool for a
block of work and is restored after; the causal FAVOR+ op, which uses both, still equals the
float64 reference on inputs with a trained model's norms and leaves the mode as it found it."""

from __future__ import annotations

import math

import pytest
import torch

from longrange.ops import numerics
from longrange.ops.favor import gaussian_orthogonal_random_matrix
from longrange.ops.favor.features import softmax_key_features, softmax_query_features
from longrange.ops.favor.fused import softmax_causal_attention
from longrange.ops.favor.naive import linear_attention_naive
from longrange.testing import relative_error

TINY = torch.finfo(torch.float32).tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_normal_equals_exp_above_the_floor_and_is_normal_below(dtype):
    floor = numerics.exp_floor(dtype)
    assert floor == pytest.approx(math.log(torch.finfo(dtype).tiny) + 1)
    x = torch.tensor([-math.inf, -1e4, floor - 5, floor, floor + 3, -1.0, 0.0, 2.5], dtype=dtype)
    out = numerics.exp_normal_(x.clone())
    torch.testing.assert_close(out[3:], x[3:].exp())
    torch.testing.assert_close(out[:3], torch.full((3,), math.exp(floor), dtype=dtype))
    assert (out >= torch.finfo(dtype).tiny).all()


def test_exp_normal_leaves_float16_unclamped():
    x = torch.tensor([-12.0, -1.0], dtype=torch.float16)
    assert numerics.exp_floor(torch.float16) is None
    assert torch.equal(numerics.exp_normal_(x.clone()), x.exp())


def test_masked_exp_is_exactly_zero_where_masked_whatever_the_input():
    x = torch.tensor([[-3.0, math.inf, 1e30], [-200.0, 0.0, -math.inf]])
    keep = torch.tensor([[True, False, False], [True, True, False]])
    out = numerics.masked_exp_(x.clone(), keep)
    assert torch.equal(out[~keep], torch.zeros(3)) and not out.isnan().any()
    torch.testing.assert_close(out[0, 0], torch.tensor(math.exp(-3.0)))
    assert out[1, 1] == 1.0
    torch.testing.assert_close(out[1, 0], torch.tensor(math.exp(numerics.exp_floor(torch.float32))))


def test_set_flush_denormals_takes_a_bool():
    with pytest.raises(TypeError, match="on must be a bool, got int"):
        numerics.set_flush_denormals(1)


def _halved_tiny_zeros() -> int:
    """How many of 4M halvings of the smallest normal float32 come out zero: all with the
    mode on every thread of the pool, none without (they are subnormal)."""
    return int((torch.full((1 << 22,), TINY) * 0.5 == 0).sum())


def test_flushed_denormals_reaches_every_thread_and_restores_the_mode(denormal_switch):
    assert not numerics.denormals_flushed() and _halved_tiny_zeros() == 0
    with numerics.flushed_denormals():
        assert numerics.denormals_flushed()
        assert _halved_tiny_zeros() == 1 << 22
    assert not numerics.denormals_flushed() and _halved_tiny_zeros() == 0
    for other in (numerics.flushed_denormals("meta"), numerics.flushed_denormals(enabled=False)):
        with other:  # work on another device, or switched off: the block runs as it is
            assert not numerics.denormals_flushed()
    # a block entered with the mode on leaves it on
    assert numerics.set_flush_denormals(True) == torch.get_num_threads()
    try:
        with numerics.flushed_denormals():
            pass
        assert numerics.denormals_flushed() and _halved_tiny_zeros() == 1 << 22
    finally:
        numerics.set_flush_denormals(False)
    assert _halved_tiny_zeros() == 0


def test_causal_favor_with_a_trained_models_norms_equals_the_float64_reference(denormal_switch):
    """Queries and keys of norm about 64 (std 8): most features far below the smallest normal
    float32, where the op clamps its exponentials and flushes subnormals; the output and the
    input gradients still match the float64 features-then-kernel reference, and the mode is
    off again afterwards."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen) for _ in range(3))
    q, k = q * 8, k * 8
    proj = gaussian_orthogonal_random_matrix(32, 16, generator=torch.Generator().manual_seed(0))

    def reference(q, k, v):
        fq = softmax_query_features(q.double(), proj.double())
        fk, scale = softmax_key_features(k.double(), proj.double(), causal=True)
        return linear_attention_naive(fq, fk, v.double(), causal=True, log_scale=scale)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = softmax_causal_attention(*leaves, proj, chunk_size=16)
    assert not numerics.denormals_flushed()
    cot = torch.randn(out.shape, generator=gen)
    out.backward(cot)
    assert not numerics.denormals_flushed()
    want_leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    want = reference(*want_leaves)
    want.backward(cot.double())
    assert relative_error(out.double(), want) < 1e-4
    for got, ref in zip(leaves, want_leaves):
        assert relative_error(got.grad.double(), ref.grad) < 1e-3
