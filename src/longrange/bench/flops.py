"""Model FLOPs and the device's matmul peak, for model FLOP utilisation (MFU).

FLOPs are counted by running the workload once under ``torch.utils.flop_counter``, so each
family is counted from the operations it really runs (its matmuls, einsums and fused attention
calls), with no per-family formula to drift. PyTorch does not count the CPU flash-attention
kernel, so its formulas are added here: forward 4·B·H·P·D over the P query-key pairs the
attention needs (N·M; with ``is_causal`` only the lower triangle, N·M - N(N-1)/2, since the
kernel skips the blocks above it), backward twice that; recomputation inside the kernel is
not model work and is not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, value_shape, is_causal: bool) -> int:
    b, h, n, d = query_shape
    m, e = key_shape[-2], value_shape[-1]
    pairs = n * m - n * (n - 1) // 2 if is_causal and n <= m else n * m
    return 2 * b * h * pairs * (d + e)


def _sdpa_cpu_flops(
    query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs
) -> int:
    return _attention_flops(query_shape, key_shape, value_shape, bool(is_causal))


def _sdpa_cpu_backward_flops(
    grad_shape,
    query_shape,
    key_shape,
    value_shape,
    out_shape_=None,
    lse_shape=None,
    dropout_p=0.0,
    is_causal=False,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return 2 * _attention_flops(query_shape, key_shape, value_shape, bool(is_causal))


# flop_counter hands custom formulas the shapes of the tensors, not the tensors.
CUSTOM = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of running ``fn`` once (matmul-like and attention operations)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(
    device: str | torch.device, *, size: int = 2048, repeats: int = 10, dtype=torch.float32
) -> float:
    """Measured FLOP/s of a square ``size`` matmul on ``device``: the best of ``repeats`` after
    two warm-ups. The best, not the median: MFU is a fraction of what the device can do, and a
    median taken while the clock or a neighbour dips understates the peak (MFU above 100%)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def growth_exponents(lengths: list[int], values: list[float]) -> list[float | None]:
    """Exponent p of cost ~ n^p between successive lengths; None for the first point."""
    out: list[float | None] = [None]
    for (n0, v0), (n1, v1) in zip(zip(lengths, values), zip(lengths[1:], values[1:])):
        if v0 and v1 and v0 > 0 and v1 > 0 and n1 != n0:
            out.append(math.log(v1 / v0) / math.log(n1 / n0))
        else:
            out.append(None)
    return out
