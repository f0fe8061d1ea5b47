"""Keeping CPU arithmetic on its fast path when values get very small.

Two traps of x86 CPUs, both met by FAVOR+ once queries and keys are large (std 4 and more:
its features and stabiliser ratios are exponentials spanning dozens of orders of magnitude),
neither by the unit-variance inputs of a benchmark:

- **Subnormal numbers** (below float32's smallest normal, 1.2e-38) cost a microcode assist
  per operation: a [96, 64, 266] x [96, 266, 65] batched product with half its inputs
  subnormal takes 84 ms instead of 0.9 ms on this project's 2-core CPU (2 threads), a scaling
  pass over them 10x its time. The cure is the flush-to-zero and denormals-are-zero mode,
  but those are bits of each thread's MXCSR register and ``torch.set_flush_denormal`` sets
  them on the calling thread only, so torch's intra-op workers keep the slow mode (the same
  product with it: 83 ms on 2 threads, 1.6 ms on one). :func:`flushed_denormals` sets them on
  every thread of torch's pool for a block of work and restores them after, through a small
  C++ helper (``denormals.cpp``, compiled on first use by :mod:`longrange.native`). Where it
  cannot be built (no compiler, not Linux, not x86) the block runs as it would have:
  :func:`flush_available` says which.
- **torch's vectorised ``exp`` leaves its fast path** for inputs whose result is not normal:
  with one float32 input in ten below -87.3 ``exp_`` over 1.6M values takes 40x its time
  (8.7 against 0.21 ms), half of them 125x; a -inf (a masked entry) costs 11x, -1e4 36x, and
  the denormal mode does not help. :func:`exp_normal_` raises such inputs to a floor first
  (one clamp pass, about half an ``exp_``), which changes a result of at most 1.2e-38 into
  3.2e-38, far below the rounding of any sum it joins; entries that must be exactly zero
  (masked kernel entries) are zeroed after the exponential (:func:`masked_exp_`) instead of
  fed -inf. float16 (whose smallest normal is 6.1e-5) is left unclamped: these ops compute
  in float32 or float64.

The causal FAVOR+ op (:mod:`longrange.ops.favor.fused`) runs its forward and backward between
:func:`flush_begin` and :func:`flush_end` and takes every exponential through these
functions: forward + backward at 16K tokens, 2 threads, queries and keys of std 4 / 8,
2,254 -> 320 ms / 2,815 -> 318 ms (std 1: 269 -> 267 ms). docs/ARCHITECTURE.md, "Subnormal
numbers", has the rest.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch
from torch import Tensor

from longrange.native import NativeUnavailable, build_library, load_library

SOURCE = Path(__file__).with_name("denormals.cpp")

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the helper cannot be used here, once known


def exp_floor(dtype: torch.dtype) -> float | None:
    """The lowest input :func:`exp_normal_` passes to ``exp``: one above the log of the
    smallest normal number of ``dtype`` (float32: -86.3; exactly at the log, exp's result may
    round to a subnormal and take the slow path), or None for float16."""
    if dtype == torch.float16:
        return None
    return math.log(torch.finfo(dtype).tiny) + 1.0


def exp_normal_(x: Tensor) -> Tensor:
    """``x.exp_()`` with inputs below :func:`exp_floor` raised to it first (in place)."""
    floor = exp_floor(x.dtype)
    return (x if floor is None else x.clamp_min_(floor)).exp_()


def masked_exp_(x: Tensor, keep: Tensor) -> Tensor:
    """exp(x) where ``keep`` (True), exactly 0 elsewhere, in place, for x <= 0 where kept (a
    stabiliser ratio; an entry elsewhere may be anything, inf included: it is clamped to 0
    before the exponential, so that it never overflows, then zeroed)."""
    return x.clamp_(exp_floor(x.dtype), 0.0).exp_().masked_fill_(~keep, 0.0)


def _load() -> ctypes.CDLL | None:
    global _library, _unavailable
    if _library is None and _unavailable is None:
        try:
            built = build_library("denormals", [SOURCE], libraries=("c10", "torch_cpu"), openmp=True)
            lib = load_library(built)
            lib.longrange_set_flush_denormals.argtypes = [ctypes.c_int]
            if lib.longrange_flush_denormals_supported():
                _library = lib
            else:
                _unavailable = "the denormal mode is set for x86 CPUs only"
        except NativeUnavailable as err:
            _unavailable = str(err)
    return _library


def flush_available() -> str | None:
    """None where :func:`flushed_denormals` sets the denormal mode on torch's threads, else the
    reason it cannot (the helper is built on first call)."""
    _load()
    return _unavailable


def set_flush_denormals(on: bool) -> int:
    """Set (or clear) flush-to-zero and denormals-are-zero on this thread and every intra-op
    thread of torch's pool, for the rest of the process; returns how many threads were set
    (0 where the helper is unavailable, see :func:`flush_available`)."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {type(on).__name__}")
    lib = _load()
    return 0 if lib is None else lib.longrange_set_flush_denormals(int(on))


def denormals_flushed() -> bool:
    """Whether the calling thread runs with flush-to-zero and denormals-are-zero."""
    lib = _load()
    return bool(lib is not None and lib.longrange_flush_denormals_state())


def flush_begin() -> bool:
    """Turn the denormal mode on for every thread of torch's pool unless it is on already;
    returns whether it did (hand that to :func:`flush_end`). Does nothing under
    ``torch.compile`` tracing (a compiled graph is another path) or where the helper is
    unavailable."""
    if torch.compiler.is_compiling():
        return False
    lib = _load()
    if lib is None or lib.longrange_flush_denormals_state():
        return False
    lib.longrange_set_flush_denormals(1)
    return True


def flush_end(was_set: bool) -> None:
    """Undo :func:`flush_begin` (when it set the mode)."""
    if was_set:
        _library.longrange_set_flush_denormals(0)


class flushed_denormals:
    """``with flushed_denormals():`` runs the block between :func:`flush_begin` and
    :func:`flush_end`: subnormal numbers flushed to zero on every thread of torch's pool, the
    mode found restored after. Only for work on the CPU and where ``enabled``: with another
    ``device`` or ``enabled=False`` the block runs as it is."""

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True) -> None:
        self.wanted = enabled and torch.device(device).type == "cpu"

    def __enter__(self) -> None:
        self.was_set = self.wanted and flush_begin()

    def __exit__(self, *exc) -> None:
        flush_end(self.was_set)
