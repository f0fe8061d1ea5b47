"""The MLP over chunks of positions with a recomputing backward (see the package docstring).

Forward: per chunk of C positions, ``h = x W1^T + b1``, ``a = act(h)``, ``y = a W2^T + b2``
into the output. Backward, per chunk: recompute h and a, then ``dW2 += dy^T a``,
``dh = act'(h) * (dy W2)``, ``dW1 += dh^T x``, ``dx = dh W1``; weight gradients accumulate
in place across chunks. Only x is saved.

Dimensions: N positions, C positions per chunk, D input width, F inner width, O output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# inner activations per chunk: about 4 MB at F = 1024 in float32
CHUNK_ELEMENTS = 1 << 20


def _relu_backward(grad: Tensor, h: Tensor) -> Tensor:
    return grad * (h > 0).to(grad.dtype)


# name -> (activation, its backward given the incoming gradient and the pre-activation)
CHUNKED_ACTIVATIONS = {
    "gelu": (F.gelu, lambda g, h: torch.ops.aten.gelu_backward(g, h)),
    "gelu_tanh": (
        lambda h: F.gelu(h, approximate="tanh"),
        lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    ),
    "relu": (F.relu, _relu_backward),
    "silu": (F.silu, lambda g, h: torch.ops.aten.silu_backward(g, h)),
}


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    if b is not None:
        return torch.addmm(b, x, w.t(), out=out)
    return torch.mm(x, w.t(), out=out)


class _ChunkedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation: str, chunk: int):
        act = CHUNKED_ACTIVATIONS[activation][0]
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        out = rows.new_empty(n, w2.shape[0])
        for start in range(0, n, chunk):
            part = rows[start : start + chunk]
            _linear(act(_linear(part, w1, b1)), w2, b2, out=out[start : start + chunk])
        ctx.save_for_backward(rows, w1, b1, w2, b2)
        ctx.activation, ctx.chunk, ctx.shape = activation, chunk, x.shape
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        rows, w1, b1, w2, b2 = ctx.saved_tensors
        act, act_backward = CHUNKED_ACTIVATIONS[ctx.activation]
        chunk = ctx.chunk
        dy = grad.reshape(-1, grad.shape[-1])
        n = rows.shape[0]
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dx = torch.empty_like(rows) if need_x else None
        dw1 = torch.zeros_like(w1) if need_w1 else None
        db1 = torch.zeros_like(b1) if b1 is not None and need_b1 else None
        dw2 = torch.zeros_like(w2) if need_w2 else None
        db2 = dy.sum(dim=0).to(b2.dtype) if b2 is not None and need_b2 else None
        for start in range(0, n, chunk):
            part, g = rows[start : start + chunk], dy[start : start + chunk]
            h = _linear(part, w1, b1)
            if dw2 is not None:
                dw2.addmm_(g.t(), act(h))
            dh = act_backward(g @ w2, h)
            if dw1 is not None:
                dw1.addmm_(dh.t(), part)
            if db1 is not None:
                db1 += dh.sum(dim=0)
            if dx is not None:
                torch.mm(dh, w1, out=dx[start : start + chunk])
        dx = None if dx is None else dx.view(ctx.shape)
        return dx, dw1, db1, dw2, db2, None, None


def mlp_chunked(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str,
    chunk_size: int | None = None,
) -> Tensor:
    """x [..., D] -> [..., O], as :func:`~longrange.ops.mlp.naive.mlp_naive`; ``chunk_size``
    positions per chunk (default: about :data:`CHUNK_ELEMENTS` inner activations)."""
    if activation not in CHUNKED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(CHUNKED_ACTIVATIONS)}, got {activation!r}")
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // w1.shape[0])
    return _ChunkedMLP.apply(x, w1, b1, w2, b2, activation, chunk)
