"""Checks of the arguments the library's functions and layers take: plain numbers, and
tensors' kinds and dtypes (nothing here reads a tensor's values, so none costs a host sync),
shared so that one rule gives one message everywhere."""

from __future__ import annotations

import torch


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is a Python int (a bool is not one) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_int(name: str, value: object) -> int:
    """``value`` when :func:`is_positive_int`; else a ValueError naming ``name``."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def kind(value: object) -> str:
    """How an error message names what it got: a tensor's dtype, else the value's type."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def floating_tensors(**named: object) -> None:
    """A TypeError naming the first of ``named`` that is not a floating-point tensor."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {kind(value)}")


def one_dtype(*, autocast_casts: bool, **named: torch.Tensor) -> None:
    """A TypeError unless the tensors ``named`` share one dtype; with ``autocast_casts`` (the
    kernels they feed cast their inputs under autocast) mixed dtypes pass while autocast is
    on for their device (a bfloat16 query against a float32 KV cache, say, while decoding)."""
    tensors = list(named.values())
    if len({t.dtype for t in tensors}) == 1:
        return
    if autocast_casts and torch.is_autocast_enabled(tensors[0].device.type):
        return
    got = ", ".join(str(t.dtype) for t in tensors)
    raise TypeError(f"{', '.join(named)} must share one dtype, got {got}")
