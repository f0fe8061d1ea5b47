"""The MLP over slices of positions with a lean backward (see the package docstring).

Forward, per slice of C positions: x' = LayerNorm(x) when a norm is given (else x), ``h = x'
W1^T + b1``, ``a = act(h)`` (a gated unit: ``act(h1) * h2`` for the two halves of h), ``y = a
W2^T + b2`` into the output. A gated unit forms h1 and h2 as two products of their own, so
that each is contiguous: the elementwise passes over a half of one [C, 2F] product read
strided rows and ran 1.5-2.7x slower (the whole op: 1.17x faster fwd + bwd at 8K positions,
F = 682). What backward keeps of each slice is ``keep``:

- "hidden": h and a;
- "pre": h only; backward forms a again (one elementwise pass);
- "input": nothing; backward forms h and a again (one more ``W1`` product).

The input itself is always kept. Backward, per slice: ``dW2 += dy^T a``, ``dh = act'(h) *
(dy W2)`` (both halves for a gated unit), ``dW1 += dh^T x'``, ``dx' = dh W1``, then through
the norm; weight gradients accumulate across slices. Slices keep every elementwise pass on
a few megabytes, which are still in cache when the next step reads them.

Under autocast (without a norm, whose backward would meet reduced-precision activations with
full-precision weights) the forward's products run in autocast's dtype; backward works in
that dtype and sums the weight gradients in the weights' own.

Dimensions: N positions, C positions per slice, D input width, F inner width, O output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# inner activations per slice of :func:`mlp_chunked`: about 4 MB at F = 1024 in float32
CHUNK_ELEMENTS = 1 << 20
# what backward keeps of each slice (module docstring)
KEEPS = ("hidden", "pre", "input")


def _relu_backward(grad: Tensor, h: Tensor) -> Tensor:
    return grad.mul_(h > 0)


# name -> (activation, its backward given the incoming gradient and the pre-activation; the
# backward may write into the gradient, always a temporary of its caller)
CHUNKED_ACTIVATIONS = {
    "gelu": (F.gelu, lambda g, h: torch.ops.aten.gelu_backward.grad_input(g, h, grad_input=g)),
    "gelu_tanh": (
        lambda h: F.gelu(h, approximate="tanh"),
        lambda g, h: torch.ops.aten.gelu_backward.grad_input(g, h, approximate="tanh", grad_input=g),
    ),
    "relu": (F.relu, _relu_backward),
    "silu": (F.silu, lambda g, h: torch.ops.aten.silu_backward.grad_input(g, h, grad_input=g)),
}


def _linear(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    if b is not None:
        return torch.addmm(b, x, w.t(), out=out)
    return torch.mm(x, w.t(), out=out)


def _pre(x: Tensor, w1: Tensor, b1: Tensor | None, glu: bool) -> tuple[Tensor, ...]:
    """h = x W1^T + b1 as (h,), or for a gated unit as its halves (h1, h2), each a product of
    its own (contiguous)."""
    if not glu:
        return (_linear(x, w1, b1),)
    biases = (None, None) if b1 is None else b1.chunk(2)
    return tuple(_linear(x, w, b) for w, b in zip(w1.chunk(2), biases))


def _hidden(pre: tuple[Tensor, ...], activation: str) -> Tensor:
    act = CHUNKED_ACTIVATIONS[activation][0]
    if len(pre) == 1:
        return act(pre[0])
    h1, h2 = pre
    return act(h1).mul_(h2)


def _hidden_backward(d_hidden: Tensor, pre: tuple[Tensor, ...], activation: str) -> tuple[Tensor, ...]:
    """The gradient of h in the layout of ``pre``; ``d_hidden`` is a temporary and is overwritten."""
    act, act_backward = CHUNKED_ACTIVATIONS[activation]
    if len(pre) == 1:
        return (act_backward(d_hidden, pre[0]),)
    h1, h2 = pre
    d_h2 = act(h1).mul_(d_hidden)
    return act_backward(d_hidden.mul_(h2), h1), d_h2


def _input_grad(dh: tuple[Tensor, ...], w1: Tensor, out: Tensor | None = None) -> Tensor:
    """dh W1, for dh in the layout of :func:`_pre`."""
    parts = w1.chunk(len(dh))
    out = torch.mm(dh[0], parts[0], out=out)
    for d, w in zip(dh[1:], parts[1:]):
        out.addmm_(d, w)
    return out


def _add_product(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b, also when autocast made a and b narrower than total."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += (a @ b).to(total.dtype)


def _normed(x: Tensor, ln_w, ln_b, eps: float | None, with_stats: bool = False):
    """x, or LayerNorm(x) when ``eps`` is given (with its mean and 1 / std if asked)."""
    if eps is None:
        return (x, None, None) if with_stats else x
    out = torch.native_layer_norm(x, x.shape[-1:], ln_w, ln_b, eps)
    return out if with_stats else out[0]


class _SlicedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2, activation, glu, rows, keep):
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        out, kept = None, []
        # no positions: one empty slice, so that the output still takes autocast's dtype
        for start in range(0, max(n, 1), rows):
            pre = _pre(_normed(flat[start : start + rows], ln_w, ln_b, eps), w1, b1, glu)
            hidden = _hidden(pre, activation)
            if out is None:  # autocast decides the products' dtype: w2 in it once
                out = hidden.new_empty(n, w2.shape[0])
                w2_in, b2_in = w2.to(hidden.dtype), None if b2 is None else b2.to(hidden.dtype)
            _linear(hidden, w2_in, b2_in, out=out[start : start + rows])
            kept += {"hidden": [*pre, hidden], "pre": list(pre), "input": []}[keep]
        ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2, b2, *kept)
        ctx.geometry = (eps, activation, glu, rows, keep, out.dtype)
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor):
        x, ln_w, ln_b, w1, b1, w2, b2, *kept = ctx.saved_tensors
        eps, activation, glu, rows, keep, dt = ctx.geometry
        need = ctx.needs_input_grad
        grads = {
            name: torch.zeros_like(t) if t is not None and need[i] else None
            for name, i, t in (
                ("ln_w", 1, ln_w),
                ("ln_b", 2, ln_b),
                ("w1", 4, w1),
                ("b1", 5, b1),
                ("w2", 6, w2),
                ("b2", 7, b2),
            )
        }
        if dt != w1.dtype:  # autocast: work in the forward's dtype
            w1, b1, w2 = w1.to(dt), None if b1 is None else b1.to(dt), w2.to(dt)
        flat = x.reshape(-1, x.shape[-1])
        dy_all = d_out.reshape(-1, d_out.shape[-1]).to(dt)
        dx = torch.empty_like(flat) if need[0] else None
        halves = 2 if glu else 1
        per = {"hidden": halves + 1, "pre": halves, "input": 0}[keep]  # tensors kept per slice
        w1_parts = (None,) * halves if grads["w1"] is None else grads["w1"].chunk(halves)
        b1_parts = (None,) * halves if grads["b1"] is None else grads["b1"].chunk(halves)
        for i, start in enumerate(range(0, flat.shape[0], rows)):
            xs, dy = flat[start : start + rows], dy_all[start : start + rows]
            normed, mean, rstd = _normed(xs, ln_w, ln_b, eps, with_stats=True)
            normed = normed.to(dt)
            pre = tuple(kept[per * i : per * i + halves]) if per else _pre(normed, w1, b1, glu)
            hidden = kept[per * i + halves] if keep == "hidden" else None
            if grads["w2"] is not None:
                _add_product(grads["w2"], dy.t(), _hidden(pre, activation) if hidden is None else hidden)
            del hidden
            if grads["b2"] is not None:
                grads["b2"] += dy.sum(dim=0)
            dh = _hidden_backward(dy @ w2, pre, activation)
            del pre
            for d, gw, gb in zip(dh, w1_parts, b1_parts):  # the row blocks of W1, as in _pre
                if gw is not None:
                    _add_product(gw, d.t(), normed)
                if gb is not None:
                    gb += d.sum(dim=0)
            if mean is None:  # no norm: dx is dh W1
                if dx is not None and dx.dtype == dh[0].dtype:
                    _input_grad(dh, w1, out=dx[start : start + rows])
                elif dx is not None:
                    dx[start : start + rows] = _input_grad(dh, w1)
                continue
            d_normed = _input_grad(dh, w1)
            mask = (need[0], grads["ln_w"] is not None, grads["ln_b"] is not None)
            d_x, d_lnw, d_lnb = torch.ops.aten.native_layer_norm_backward(
                d_normed, xs, xs.shape[-1:], mean, rstd, ln_w, ln_b, mask
            )
            if dx is not None:
                dx[start : start + rows] = d_x
            if d_lnw is not None:
                grads["ln_w"] += d_lnw
            if d_lnb is not None:
                grads["ln_b"] += d_lnb
        dx = None if dx is None else dx.view(x.shape)
        g = grads
        return dx, g["ln_w"], g["ln_b"], None, g["w1"], g["b1"], g["w2"], g["b2"], None, None, None, None


def sliced_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str,
    rows: int,
    keep: str = "input",
    glu: bool = False,
    norm: tuple[Tensor | None, Tensor | None, float] | None = None,
) -> Tensor:
    """x [..., D] -> [..., O] (module docstring): ``rows`` positions per slice, ``keep`` one of
    :data:`KEEPS`, ``glu`` gates the two halves of w1's output (w1 [2F, D]), ``norm`` the
    (weight, bias, eps) of a LayerNorm in front."""
    if activation not in CHUNKED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(CHUNKED_ACTIVATIONS)}, got {activation!r}")
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    ln_w, ln_b, eps = (None, None, None) if norm is None else norm
    return _SlicedMLP.apply(x, ln_w, ln_b, eps, w1, b1, w2, b2, activation, glu, rows, keep)


def mlp_chunked(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    activation: str,
    chunk_size: int | None = None,
    keep: str = "input",
) -> Tensor:
    """x [..., D] -> [..., O], as :func:`~longrange.ops.mlp.naive.mlp_naive`, keeping only x
    for backward (or what ``keep`` says, one of :data:`KEEPS`); ``chunk_size`` positions per
    slice (default: about :data:`CHUNK_ELEMENTS` inner activations)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    rows = chunk_size or max(1, CHUNK_ELEMENTS // w1.shape[0])
    return sliced_mlp(x, w1, b1, w2, b2, activation=activation, rows=rows, keep=keep)
