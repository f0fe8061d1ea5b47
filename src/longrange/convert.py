"""Loading weights of models built with the reference packages.

``load_reference(model, reference_state_dict)`` copies a reference model's weights into a
longrange model built with the same keywords. Each family registers its own mapping with
:func:`register_converter`; the mapping raises ValueError when a weight is missing or its
shape does not match.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor, nn

Converter = Callable[[nn.Module, dict[str, Tensor]], None]
_CONVERTERS: dict[type, Converter] = {}


def register_converter(model_class: type, fn: Converter) -> None:
    _CONVERTERS[model_class] = fn


def load_reference(model: nn.Module, reference_state_dict: dict[str, Tensor]) -> nn.Module:
    """Copy ``reference_state_dict`` (a reference package model's ``state_dict()``) into
    ``model`` in place and return it."""
    if not isinstance(reference_state_dict, dict):
        raise TypeError(f"reference_state_dict must be a dict, got {type(reference_state_dict).__name__}")
    for cls in type(model).__mro__:
        if cls in _CONVERTERS:
            _CONVERTERS[cls](model, reference_state_dict)
            return model
    known = ", ".join(sorted(c.__name__ for c in _CONVERTERS)) or "none registered yet"
    raise ValueError(f"no reference converter for {type(model).__name__}; known: {known}")


def copy_weights(model: nn.Module, reference: dict[str, Tensor], mapping: dict[str, str]) -> None:
    """Copy ``reference[src]`` into the parameter or buffer ``dst`` for each ``dst: src``,
    checking that every name exists and every shape matches."""
    ours = dict(model.state_dict())
    for dst, src in mapping.items():
        if dst not in ours:
            raise ValueError(f"converter error: {type(model).__name__} has no weight {dst!r}")
        if src not in reference:
            raise ValueError(f"reference state dict has no weight {src!r} (needed for {dst!r})")
        if tuple(ours[dst].shape) != tuple(reference[src].shape):
            raise ValueError(
                f"shape mismatch for {dst!r}: ours {tuple(ours[dst].shape)}, reference {src!r} "
                f"{tuple(reference[src].shape)}"
            )
        ours[dst] = reference[src]
    model.load_state_dict(ours)


def rename_blocks(key: str) -> str:
    """A reference stack's weight name -> ours. The references keep the blocks of a plain
    stack as ``<stack>.layers.N.0`` / ``.1`` and of a reversible one as
    ``<stack>.blocks.N.f.net`` / ``.g.net`` (``<stack>`` is ``layers`` or ``net``); ours are
    ``layers.blocks.N.f`` / ``.g`` in both."""
    key = re.sub(r"(^|\.)(?:net|layers)\.layers\.(\d+)\.0\.", r"\1layers.blocks.\2.f.", key)
    key = re.sub(r"(^|\.)(?:net|layers)\.layers\.(\d+)\.1\.", r"\1layers.blocks.\2.g.", key)
    return re.sub(r"(^|\.)(?:net|layers)\.blocks\.(\d+)\.([fg])\.net\.", r"\1layers.blocks.\2.\3.", key)
