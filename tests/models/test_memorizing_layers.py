"""memorizing's attention maths: the fused forms (bias added inside the score GEMM, the
causal mask folded into the relative distances, one GEMM over every head against the shared
key/value head) equal the plain einsum forms, forward and gradients."""

import pytest
import torch

from longrange.models.memorizing.layers import causal_bias, relative_bias
from longrange.modules.positional import T5RelativePositionBias
from longrange.ops.shared_kv.naive import shared_kv_output, shared_kv_scores
from longrange.testing import assert_same_forward_backward


@pytest.mark.parametrize("n,m", [(7, 7), (63, 63), (5, 23), (500, 512)], ids=["square", "odd", "xl", "long"])
def test_causal_relative_bias_equals_masking_the_bias(n, m):
    torch.manual_seed(n)
    table = T5RelativePositionBias(heads=3, causal=True, scale=4.0, num_buckets=16, max_distance=64)
    grad = torch.randn(3, n, m)
    got = relative_bias(table, n, m, causal=True)
    (got * grad).sum().backward()
    got_grad, table.relative_attention_bias.weight.grad = table.relative_attention_bias.weight.grad, None
    want = causal_bias(relative_bias(table, n, m), n, m)
    (want * grad).sum().backward()
    assert torch.equal(got, want)
    torch.testing.assert_close(got_grad, table.relative_attention_bias.weight.grad)


@pytest.mark.parametrize("b,h,n,m,d", [(1, 4, 9, 9, 8), (2, 3, 63, 70, 16)], ids=["one-row", "xl-keys"])
def test_shared_kv_gemms_equal_einsum(b, h, n, m, d):
    gen = torch.Generator().manual_seed(m)
    q = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)  # heads split from one projection
    keys, values = torch.randn(b, m, d, generator=gen), torch.randn(b, m, d, generator=gen)
    bias = torch.randn(h, n, m, generator=gen)

    def fused(q, keys, values, bias):
        return shared_kv_output(shared_kv_scores(q, keys, bias).softmax(-1), values)

    def naive(q, keys, values, bias):
        weights = (torch.einsum("bhnd,bmd->bhnm", q, keys) + bias).softmax(-1)
        return torch.einsum("bhnm,bmd->bhnd", weights, values)

    assert_same_forward_backward(fused, naive, [q, keys, values, bias], rtol=1e-5)
