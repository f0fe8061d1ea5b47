"""The bias gradient of the blocked attention: per head, the sums of the diagonals of a block
of score gradients.

A block holds the gradients of P query positions (first .. first + P - 1 of N) against keys
0 .. E - 1, as rows ordered (position, head) of ``grad`` [P * H, E]; entry (i, h, j) belongs
to the bias value of key-minus-query distance j - (first + i), kept at column
j - (first + i) + N - 1 of ``out`` [H, N + M - 1].

:func:`diagonal_sums` adds each row in place into ``out`` with a compiled loop
(``diagonal.cpp``, built by :mod:`longrange.native`; a thread owns whole heads) where it can:
float32 on the CPU. Elsewhere, or where it cannot be built (one RuntimeWarning says why),
:func:`diagonal_sums_torch` does the same with torch ops: a zero-padded copy of the block read
with a skewed stride, then one sum over the positions. For a [512, <= 512] block at 4 heads
(512 tokens, blocks of 128 positions) the compiled loop reads the gradient once instead of
copying it and reading it twice: the four blocks of a layer 0.43 -> 0.10 ms on the 2-core CPU
(0.93 -> 0.18 ms inside the attention's backward pass, whose blocks are fresh from the
softmax).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.native import OptionalLibrary

SOURCE = Path(__file__).with_name("diagonal.cpp")


def _declare(lib: ctypes.CDLL) -> None:
    lib.longrange_diagonal_sums.restype = ctypes.c_int


LIBRARY = OptionalLibrary(
    "diagonal_sums",
    [SOURCE],
    missing="the compiled diagonal sums are unavailable",
    instead="the attention's bias gradient is summed with torch ops instead (the same sums, slower)",
    setup=_declare,
    openmp=True,
)


def _load() -> ctypes.CDLL | None:
    return LIBRARY.load()


def compiled_available() -> bool:
    """Whether :func:`diagonal_sums` can run its compiled loop here."""
    return _load() is not None


def diagonal_sums_torch(grad: Tensor, heads: int, first: int, n: int, out: Tensor) -> None:
    """:func:`diagonal_sums` with torch ops, for any device and dtype."""
    p = grad.shape[0] // heads
    e = grad.shape[1]
    per_head = grad.view(p, heads, e).transpose(0, 1)  # [H, P, E]
    width = p + e
    # Row i of the padded copy is [p zeros, row i]; read with a row stride of width + 1 from
    # element 1, row i is shifted right by p - 1 - i, so column t holds the entry of
    # distance t - (p - 1) from the row's query (or a zero); one extra zero row closes the
    # last read.
    padded = F.pad(per_head, (p, 0, 0, 1))  # [H, P + 1, P + E], contiguous
    rows = padded.as_strided((heads, p, p + e - 1), ((p + 1) * width, width + 1, 1), 1)
    start = n - first - p
    out[:, start : start + p + e - 1] += rows.sum(1, dtype=out.dtype)


def diagonal_sums(grad: Tensor, heads: int, first: int, n: int, out: Tensor) -> None:
    """Add to ``out`` [H, L] the diagonal sums of ``grad`` [P * H, E] (rows ordered
    (position, head), any row stride; see the module docstring for where each goes)."""
    p, e = grad.shape[0] // heads, grad.shape[1]
    if n - first - p < 0 or n - first + e - 1 > out.shape[1]:
        raise ValueError(f"a block of {p} positions from {first} against {e} keys does not fit n={n}")
    lib = None
    if grad.device.type == "cpu" and grad.dtype == out.dtype == torch.float32 and grad.stride(1) == 1:
        lib = _load() if out.is_contiguous() else None
    if lib is None:
        diagonal_sums_torch(grad, heads, first, n, out)
        return
    status = lib.longrange_diagonal_sums(
        ctypes.c_void_p(grad.data_ptr()),
        ctypes.c_int64(p),
        ctypes.c_int64(heads),
        ctypes.c_int64(e),
        ctypes.c_int64(grad.stride(0)),
        ctypes.c_int64(first),
        ctypes.c_int64(n),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int64(out.stride(0)),
        ctypes.c_int(torch.get_num_threads()),
    )
    if status != 0:
        raise ValueError(f"bad block for the diagonal sums: {p} positions from {first}, {e} keys, n={n}")
