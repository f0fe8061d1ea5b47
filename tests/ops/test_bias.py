"""ops/dense/bias: the contiguous Toeplitz matrix equals the flipped sliding-window reference,
forward and gradient, for any leading dimensions and shapes (a single query or key, more
queries than keys and the reverse), and bad sizes are refused before any work."""

from __future__ import annotations

import pytest
import torch

from longrange.ops.dense.bias import toeplitz, toeplitz_reference
from longrange.testing import assert_same_forward_backward


@pytest.mark.parametrize(
    "lead, n, m",
    [((4,), 64, 64), ((4,), 3, 9), ((2, 3), 9, 3), ((), 1, 5), ((1,), 5, 1), ((2,), 16, 48)],
)
def test_toeplitz_equals_reference(lead, n, m):
    gen = torch.Generator().manual_seed(n * m)
    values = torch.randn(*lead, n + m - 1, generator=gen, dtype=torch.float64)
    out = toeplitz(values, n, m)
    assert out.shape == (*lead, n, m) and out.is_contiguous()
    i, j = 2 % n, 3 % m
    assert torch.equal(out[..., i, j], values[..., j - i + n - 1])
    assert_same_forward_backward(
        lambda v: toeplitz(v, n, m), lambda v: toeplitz_reference(v, n, m), [values], rtol=0, grad_rtol=1e-12
    )


def test_toeplitz_gradcheck_and_strided_gradient():
    values = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: toeplitz(v, 3, 6), (values,))
    # a gradient that is a transposed view reaches the values as the same sums
    grad = torch.randn(2, 6, 3, dtype=torch.float64).transpose(-1, -2)
    (fast,) = torch.autograd.grad(toeplitz(values, 3, 6), values, grad)
    (plain,) = torch.autograd.grad(toeplitz_reference(values, 3, 6), values, grad)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "shape, n, m, match",
    [
        ((4, 10), 5, 5, r"values must be \[\.\.\., n \+ m - 1 = 9\]"),
        ((9,), 0, 10, "n must be a positive int"),
        ((9,), 5, 5.0, "m must be a positive int"),
        ((9,), True, 9, "n must be a positive int"),
    ],
)
def test_toeplitz_refuses_bad_sizes(shape, n, m, match):
    with pytest.raises(ValueError, match=match):
        toeplitz(torch.zeros(shape), n, m)
