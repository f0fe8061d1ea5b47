"""modules/autopad: a multiple that is not a positive int is refused by name; a negative one
cropped the input (or the context) silently, a fraction or 0 changed nothing silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrange.modules.autopad import Autopadder, pad_to_multiple


class _Net(nn.Module):
    pad_multiple = 4

    def forward(self, x, mask=None, context=None, context_mask=None):
        self.context = context
        return x


@pytest.mark.parametrize("multiple", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_pad_to_multiple_refuses_bad_multiple(multiple):
    with pytest.raises(ValueError, match="multiple must be a positive int"):
        pad_to_multiple(torch.zeros(2, 5, 3), multiple)


@pytest.mark.parametrize("multiple", [0, -3, 2.5], ids=["zero", "negative", "float"])
def test_autopadder_refuses_bad_context_pad_multiple(multiple):
    with pytest.raises(ValueError, match="context_pad_multiple"):
        Autopadder(_Net(), context_pad_multiple=multiple)


def test_context_is_padded_to_its_multiple():
    net = _Net()
    Autopadder(net, context_pad_multiple=3)(torch.zeros(2, 5, 3), context=torch.zeros(2, 5, 3))
    assert net.context.shape == (2, 6, 3)
