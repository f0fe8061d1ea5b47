"""ChunkedFeedForward: the same weights and results as FeedForward, on the chunked op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrange.modules.chunked_feedforward import ChunkedFeedForward, activation_name
from longrange.modules.feedforward import FeedForward
from longrange.testing import assert_close


@pytest.mark.parametrize(
    "activation, glu, dropout",
    [(None, False, 0.0), (nn.ReLU, False, 0.0), (nn.Tanh, False, 0.0), (None, True, 0.0), (None, False, 0.2)],
    ids=["gelu", "relu", "tanh-plain-path", "glu-plain-path", "dropout-plain-path"],
)
def test_same_results_and_gradients_as_feedforward(activation, glu, dropout):
    torch.manual_seed(0)
    plain = FeedForward(8, mult=3, activation=activation, glu=glu, dropout=dropout).double()
    chunked = ChunkedFeedForward(8, mult=3, activation=activation, glu=glu, dropout=dropout).double()
    chunked.load_state_dict(plain.state_dict())
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    outs, grads = [], []
    for layer in (plain, chunked):
        torch.manual_seed(1)  # the same dropout draws
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert_close(outs[1], outs[0], rtol=1e-12)
    for a, b in zip(grads[1], grads[0]):
        assert_close(a, b, rtol=1e-12)


def test_activation_names():
    assert activation_name(nn.GELU()) == "gelu"
    assert activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name(nn.SiLU()) == "silu"
    assert activation_name(nn.Tanh()) is None


def test_an_empty_batch_or_sequence_runs_like_feedforward():
    ff = ChunkedFeedForward(8, mult=2).eval()
    for shape in [(0, 5, 8), (2, 0, 8)]:
        x = torch.randn(*shape)
        assert ff(x).shape == FeedForward.forward(ff, x).shape == shape
