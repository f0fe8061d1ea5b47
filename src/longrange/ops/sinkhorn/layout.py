"""Memory layouts for bucket attention, each one pass forward and one pass backward.

- :func:`split_heads`: a fused projection [B, N, C * H * D] -> C contiguous [B, H, N, D]
  tensors, heads from ``rotate_from`` on rotated left in time by ``shift`` (the causal
  Sinkhorn half-heads), so every bucket is a plain view afterwards;
- :func:`merge_heads`: the inverse for the attention output, [B, H, N, D] parts ->
  [B, N, H * D], rotating the same heads back;
- :func:`gather_weighted`: the keys (or values) each query bucket attends to, written once:
  its K picked buckets scaled by their weights (a pick of -1 is the null bucket), then
  optionally its own bucket. Backward recomputes the picks instead of keeping them.

Written as autograd functions because the same results from cat / roll / slicing cost
several full copies and zero-filled slice gradients each way.

Dimensions: B batch, H heads, N positions, C stacked tensors (q, k, v), D head width,
R = B * H rows, U query buckets, V source buckets of T positions, K picks, X = T * D.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotated_copy(dst: Tensor, src: Tensor, start: int, shift: int) -> None:
    """dst[..., h, t, :] = src[..., h, (t + shift) % N, :] for heads h >= start (dims -3, -2)."""
    n = src.shape[-2]
    dst[..., :start, :, :].copy_(src[..., :start, :, :])
    if start < src.shape[-3]:
        if shift % n == 0:
            dst[..., start:, :, :].copy_(src[..., start:, :, :])
            return
        shift %= n
        dst[..., start:, : n - shift, :].copy_(src[..., start:, shift:, :])
        dst[..., start:, n - shift :, :].copy_(src[..., start:, :shift, :])


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, stacked: int, heads: int, start: int, shift: int):
        b, n, _ = x.shape
        ctx.shape, ctx.args = x.shape, (stacked, heads, start, shift)
        src = x.reshape(b, n, stacked, heads, -1).permute(2, 0, 3, 1, 4)
        out = x.new_empty(stacked, b, heads, n, src.shape[-1])
        _rotated_copy(out, src, start, shift)
        return tuple(out[i] for i in range(stacked))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        stacked, heads, start, shift = ctx.args
        b, n, _ = ctx.shape
        d = ctx.shape[-1] // (stacked * heads)
        out = grads[0].new_empty(b, n, stacked, heads, d) if grads[0] is not None else None
        if out is None:
            out = next(g for g in grads if g is not None).new_empty(b, n, stacked, heads, d)
        dst = out.permute(2, 0, 3, 1, 4)
        for i, g in enumerate(grads):
            if g is None:
                dst[i].zero_()
            else:
                _rotated_copy(dst[i], g, start, -shift)
        return out.reshape(ctx.shape), None, None, None, None


class _MergeHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, start: int, shift: int, *parts: Tensor) -> Tensor:
        b, _, n, d = parts[0].shape
        ctx.sizes, ctx.args = [p.shape[1] for p in parts], (start, shift)
        heads = sum(ctx.sizes)
        out = parts[0].new_empty(b, n, heads, d)
        view = out.permute(0, 2, 1, 3)
        src = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        _rotated_copy(view, src, start, -shift)
        return out.reshape(b, n, heads * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        start, shift = ctx.args
        b, n, _ = grad.shape
        heads = sum(ctx.sizes)
        src = grad.reshape(b, n, heads, -1).permute(0, 2, 1, 3)
        full = grad.new_empty(b, heads, n, src.shape[-1])
        _rotated_copy(full, src, start, shift)
        return (None, None, *full.split(ctx.sizes, dim=1))


def split_heads(x: Tensor, stacked: int, heads: int, *, rotate_from: int | None = None, shift: int = 0):
    """x [B, N, C * H * D] -> C tensors [B, H, N, D] (contiguous); heads ``rotate_from`` ..
    are rotated left by ``shift`` positions (out[t] = in[(t + shift) % N]). Under
    ``torch.compile`` the plain ops (:func:`split_heads_reference`), which the compiler fuses
    and traces with symbolic sizes."""
    if torch.compiler.is_compiling():
        return split_heads_reference(x, stacked, heads, rotate_from=rotate_from, shift=shift)
    start = heads if rotate_from is None else rotate_from
    return _SplitHeads.apply(x, stacked, heads, start, shift)


def merge_heads(*parts: Tensor, rotate_from: int | None = None, shift: int = 0) -> Tensor:
    """[B, H_i, N, D] parts (concatenated over heads) -> [B, N, H * D]; heads ``rotate_from`` ..
    are rotated back right by ``shift`` (undoing :func:`split_heads`); plain ops under
    ``torch.compile`` (:func:`merge_heads_reference`)."""
    if torch.compiler.is_compiling():
        return merge_heads_reference(*parts, rotate_from=rotate_from, shift=shift)
    heads = sum(p.shape[1] for p in parts)
    start = heads if rotate_from is None else rotate_from
    return _MergeHeads.apply(start, shift, *parts)


def rotate_heads(x: Tensor, start: int, shift: int, *, dim: int = 2) -> Tensor:
    """Rotate heads ``start:`` (dim 1) of x left by ``shift`` along ``dim``."""
    if start >= x.shape[1] or shift == 0:
        return x
    return torch.cat([x[:, :start], x[:, start:].roll(-shift, dims=dim)], dim=1)


def unrotate_heads(x: Tensor, start: int, shift: int, *, dim: int = 2) -> Tensor:
    """Undo :func:`rotate_heads`."""
    return rotate_heads(x, start, -shift, dim=dim)


def split_heads_reference(
    x: Tensor, stacked: int, heads: int, *, rotate_from: int | None = None, shift: int = 0
) -> tuple[Tensor, ...]:
    """:func:`split_heads` by reshape, permute and roll."""
    start = heads if rotate_from is None else rotate_from
    parts = x.unflatten(-1, (stacked, heads, -1)).permute(2, 0, 3, 1, 4)  # [C, B, H, N, D]
    return tuple(rotate_heads(t, start, shift).contiguous() for t in parts.unbind(0))


def merge_heads_reference(*parts: Tensor, rotate_from: int | None = None, shift: int = 0) -> Tensor:
    """:func:`merge_heads` by cat, roll and reshape."""
    full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    start = full.shape[1] if rotate_from is None else rotate_from
    return unrotate_heads(full, start, shift).transpose(1, 2).flatten(2)


def _picked(src: Tensor, null: Tensor | None, picks: Tensor) -> Tensor:
    """src [R, V, X], picks [R, U, K] (-1 = null) -> [R, U, K, X]."""
    r, v, x = src.shape
    rows = torch.arange(r, device=src.device).reshape(r, 1, 1) * v + picks.clamp_min(0)
    out = src.reshape(r * v, x).index_select(0, rows.reshape(-1)).reshape(*picks.shape, x)
    if null is not None:
        where = (picks < 0).nonzero(as_tuple=True)
        if where[0].numel():
            out[where] = null[where[0]].to(out.dtype)
    return out


class _GatherWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, null, own, picks, weights):
        r, u, k = picks.shape
        x = src.shape[-1]
        extra = 0 if own is None else own.shape[-1]
        out = src.new_empty(r, u, k * x + extra)
        w = weights[..., None].to(src.dtype)
        torch.mul(_picked(src, null, picks), w, out=out[:, :, : k * x].view(r, u, k, x))
        if own is not None:
            out[:, :, k * x :].copy_(own)
        ctx.save_for_backward(src, null, picks, weights)
        ctx.has_own = own is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        src, null, picks, weights = ctx.saved_tensors
        r, u, k = picks.shape
        v, x = src.shape[1], src.shape[2]
        g_sorted = grad[:, :, : k * x].reshape(r, u, k, x)
        grad_w = None
        if ctx.needs_input_grad[4]:
            # vecdot, not einsum: einsum's batched [1 x X] x [X x 1] products ran 4x slower on CPU
            grad_w = torch.linalg.vecdot(g_sorted, _picked(src, null, picks)).to(weights.dtype)
        g_picked = (g_sorted * weights[..., None].to(grad.dtype)).reshape(-1, x)
        flat = picks.reshape(-1)
        real = flat >= 0
        rows = (torch.arange(r, device=grad.device).reshape(r, 1, 1) * v + picks.clamp_min(0)).reshape(-1)
        grad_src = grad.new_zeros(r * v, x)
        grad_null = None
        if null is not None and not bool(real.all()):
            which = (~real).nonzero().squeeze(-1)
            grad_null = grad.new_zeros(r, x).index_add_(0, which // (u * k), g_picked.index_select(0, which))
            g_picked = g_picked * real[:, None].to(g_picked.dtype)
        elif null is not None:
            grad_null = grad.new_zeros(r, x)
        grad_src.index_add_(0, rows, g_picked)
        grad_own = grad[:, :, k * x :] if ctx.has_own else None
        return grad_src.reshape(r, v, x), grad_null, grad_own, None, grad_w


def gather_weighted(
    src: Tensor, picks: Tensor, weights: Tensor, *, null: Tensor | None = None, own: Tensor | None = None
) -> Tensor:
    """src [R, V, X]; picks, weights [R, U, K] (a pick of -1 takes ``null`` [R, X]); own
    [R, U, Y] -> [R, U, K * X + Y]: the weighted picks side by side, then ``own``."""
    if null is None and bool((picks < 0).any()):
        raise ValueError("a pick of -1 (null bucket) needs null")
    return _GatherWeighted.apply(src, null, own, picks, weights)
