"""Weight initialisation shared by the native decoders (GPT-2 style).

Every linear and embedding weight is drawn from N(0, 0.02) and every bias is zero; the output
projections of the residual branches are drawn with the width shrunk by sqrt(2 * depth), so
that the residual stream starts near unit scale whatever the depth. The reference-compatible
classes keep their references' initialisation instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

STD = 0.02


def _normal_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_residual_stack(model: nn.Module, residual_outputs: Iterable[nn.Linear], depth: int) -> None:
    """Initialise ``model`` as the module docstring says; ``residual_outputs`` are the linear
    layers that write into the residual stream (two per block)."""
    model.apply(_normal_weights)
    for linear in residual_outputs:
        nn.init.normal_(linear.weight, std=STD / (2 * depth) ** 0.5)
