"""The reference MLP: ``F.linear``, the activation, ``F.linear``; autograd does the rest."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": lambda h: h.tanh(),
    "sigmoid": lambda h: h.sigmoid(),
    "leaky_relu": F.leaky_relu,
}


def mlp_naive(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *, activation: str
) -> Tensor:
    """x [..., D] -> [..., O] (see :func:`longrange.ops.mlp.mlp`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return F.linear(ACTIVATIONS[activation](F.linear(x, w1, b1)), w2, b2)
