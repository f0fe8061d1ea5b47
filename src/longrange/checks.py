"""Checks of the plain numbers the library's functions and layers take (Python values only:
nothing here reads a tensor), shared so that one rule gives one message everywhere."""

from __future__ import annotations


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is a Python int (a bool is not one) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_int(name: str, value: object) -> int:
    """``value`` when :func:`is_positive_int`; else a ValueError naming ``name``."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
