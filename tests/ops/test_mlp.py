"""The MLP op: chunked (recomputing backward) == naive, forward and every gradient."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from longrange.ops.mlp import mlp, mlp_chunked, mlp_naive
from longrange.testing import assert_same_forward_backward


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("n, bias", [(37, True), (300, False)], ids=["odd-bias", "no-bias"])
def test_chunked_matches_naive(activation, n, bias):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, w1, w2 = rand(2, n, 8), rand(20, 8), rand(6, 20)
    inputs = [x, w1, w2] + ([rand(20), rand(6)] if bias else [])

    def args(x, w1, w2, b1=None, b2=None):
        return x, w1, b1, w2, b2

    def fast(*t):
        return mlp_chunked(*args(*t), activation=activation, chunk_size=16)

    def naive(*t):
        return mlp_naive(*args(*t), activation=activation)

    assert_same_forward_backward(fast, naive, inputs, rtol=1e-10)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("keep", ["hidden", "pre", "input"])
def test_sliced_gated_unit_matches_naive(activation, keep):
    """act(h1) * h2 with h1, h2 the halves of x W1^T + b1 (computed as two products)."""
    from longrange.ops.mlp.chunked import sliced_mlp
    from longrange.ops.mlp.naive import ACTIVATIONS

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = [rand(2, 37, 8), rand(20, 8), rand(20), rand(6, 10), rand(6)]

    def fast(x, w1, b1, w2, b2):
        return sliced_mlp(x, w1, b1, w2, b2, activation=activation, rows=16, keep=keep, glu=True)

    def naive(x, w1, b1, w2, b2):
        h1, h2 = (x @ w1.T + b1).chunk(2, dim=-1)
        return (ACTIVATIONS[activation](h1) * h2) @ w2.T + b2

    assert_same_forward_backward(fast, naive, inputs, rtol=1e-10)


def test_auto_falls_back_to_naive_and_refuses_unknown_names():
    x, w1, w2 = torch.randn(5, 4), torch.randn(6, 4), torch.randn(3, 6)
    assert torch.allclose(mlp(x, w1, None, w2, None, activation="tanh"), torch.tanh(x @ w1.t()) @ w2.t())
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp_naive(x, w1, None, w2, None, activation="swish")
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp_chunked(x, w1, None, w2, None, activation="tanh")
    with pytest.raises(ValueError, match="backend must be one of"):
        mlp(x, w1, None, w2, None, activation="gelu", backend="fused")


def test_autocast_runs_the_sliced_path_in_its_precision():
    """Under autocast the sliced op's products run in autocast's dtype, and a bf16 step gives
    the naive op's gradients (in the weights' dtype) to bf16's precision."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 8, generator=gen)
    weights = [torch.randn(*s, generator=gen).requires_grad_() for s in ((20, 8), (20,), (6, 20), (6,))]
    grads = []
    for op in (partial(mlp_chunked, chunk_size=16), mlp_naive):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = op(x, weights[0], weights[1], weights[2], weights[3], activation="gelu")
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float().square().sum(), weights))
    for a, b in zip(*grads):  # bf16 products; the sliced op sums its slices' in float32
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_auto_keeps_the_pre_activations_while_small_and_only_the_input_beyond(monkeypatch):
    """The chunked backend keeps [N, F] pre-activations for backward up to KEEP_PRE_BYTES per
    call, the input alone above it; the gradients are the naive op's either way."""
    import longrange.ops.mlp as ops_mlp

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(20, 8, generator=gen, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    w2 = torch.randn(6, 20, generator=gen, dtype=torch.float64)
    weights = [w.requires_grad_() for w in (w1, b1, w2)]

    def run(cap):
        monkeypatch.setattr(ops_mlp, "KEEP_PRE_BYTES", cap)
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = mlp(x, w1, b1, w2, None, activation="gelu")
        return saved, torch.autograd.grad(out.square().sum(), [x, *weights])

    kept_small, grads_small = run(150 * 20 * 8)  # exactly the pre-activations' bytes
    kept_large, grads_large = run(150 * 20 * 8 - 1)
    assert (150, 20) in kept_small
    assert (150, 20) not in kept_large
    out = mlp_naive(x, w1, b1, w2, None, activation="gelu")
    expected = torch.autograd.grad(out.square().sum(), [x, *weights])
    for got in (grads_small, grads_large):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("keep", ["hidden", "pre", "input"])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 3, 8)], ids=["n0", "len0", "batch0"])
def test_no_positions_give_an_empty_output_and_zero_weight_gradients(shape, keep):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w1 = torch.randn(20, 8, generator=gen, requires_grad=True)
    w2 = torch.randn(6, 20, generator=gen, requires_grad=True)
    out = mlp_chunked(x, w1, None, w2, None, activation="gelu", keep=keep)
    assert out.shape == (*shape[:-1], 6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert not w1.grad.any() and not w2.grad.any()


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    x, w1, w2 = torch.randn(2, 3, 8), torch.randn(20, 8), torch.randn(6, 20)
    with pytest.raises(ValueError, match="chunk_size"):
        mlp_chunked(x, w1, None, w2, None, activation="gelu", chunk_size=chunk_size)
