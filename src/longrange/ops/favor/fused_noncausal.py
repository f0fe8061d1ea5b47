"""Non-causal FAVOR+ with the softmax kernel in one autograd function: the Performer's default.

Same maths as :func:`~longrange.ops.favor.features.softmax_query_features` /
:func:`~longrange.ops.favor.features.softmax_key_features` (``causal=False``, with or without
the epsilon) followed by :func:`~longrange.ops.favor.linear.linear_attention`, with a
hand-written backward. With x' = x D^-1/4, W' = W D^-1/4 and r = M^-1/2, the features are
phi = E + r eps with
  E_q = r exp(q W'^T - max_m q W'^T - [eps > 0] |q'|^2 / 2)
  E_k = r exp(k W'^T - |k'|^2 / 2 - c),  c = max over unmasked keys of
                                             max_m k W'^T - [eps = 0] |k'|^2 / 2
(the stabilisers are constants to the gradient, as in the feature maps).

The epsilon is never added to a feature tensor: it is a rank-one term of each product,
  phi_q S = E_q S + r eps 1 (sum_m S_m),   phi_k^T [V, 1] = E_k^T [V, 1] + r eps 1 sum_l keep_l [V_l, 1],
and the gradient through an exponential is d_phi o E, so the [N, M] tensors are the
projections turned into E in place, and nothing else of that size is formed in the forward
pass. The autograd graph of the plain maps spends a pass over [N, M] for every operation
and its derivative (the shift, the clamp's mask, the epsilon, the ratio).

What backward needs is chosen by size (``keep_bytes``, as in the causal op): E_q and E_k
while they fit, else only their shifts, and backward forms them again.

Dimensions: B batch, H heads, N queries, L keys, D head width, M features, E value width
(F = E + 1 with the normaliser column).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longrange.ops.favor.features import check_key_mask
from longrange.ops.favor.fused import KEEP_BYTES
from longrange.ops.favor.linear import normalise_backward, normaliser, with_ones
from longrange.ops.numerics import exp_normal_, flushed_denormals


def _projected(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(x W'^T [B, H, N, M], |x'|^2 / 2 [B, H, N, 1])."""
    return x @ weight.T, x.square().sum(-1, keepdim=True).mul_(weight.shape[-1] ** -0.5 / 2)


def _shifts(q: Tensor, k: Tensor, weight: Tensor, keep: Tensor | None, eps: float):
    """The projections and what each row's exponent subtracts (r folded in): (dash_q, shift_q
    [B, H, N, 1], dash_k, shift_k [B, H, L, 1])."""
    log_ratio = 0.5 * math.log(weight.shape[0])
    dash_q, half_q = _projected(q, weight)
    shift_q = dash_q.amax(dim=-1, keepdim=True)
    if eps:
        shift_q += half_q
    dash_k, half_k = _projected(k, weight)
    row_max = dash_k.amax(dim=-1, keepdim=True)
    if not eps:
        row_max -= half_k
    if keep is None:
        stab = row_max.amax(dim=-2, keepdim=True)
    else:
        masked = row_max.masked_fill(~keep[..., None], float("-inf")).amax(dim=-2, keepdim=True)
        stab = torch.maximum(masked, row_max)  # a masked key's own max keeps its zeroed E finite
    return dash_q, shift_q.add_(log_ratio), dash_k, (half_k + stab).add_(log_ratio)


def _exp(dash: Tensor, shift: Tensor, keep: Tensor | None) -> Tensor:
    """E = exp(dash - shift) in place, zero on masked keys."""
    e = exp_normal_(dash.sub_(shift))
    return e if keep is None else e.mul_(keep[..., None])


def _eps_rows(eps_r: float, v1: Tensor, keep: Tensor | None) -> Tensor:
    """r eps sum_l keep_l [V_l, 1]: the epsilon's share of every row of the key sums [B, H, 1, F]."""
    rows = v1 if keep is None else v1 * keep[..., None]
    return rows.sum(dim=-2, keepdim=True).mul_(eps_r)


class _SoftmaxNoncausal(torch.autograd.Function):
    """q [B, H, N, D], k [B, H, L, D], v1 [B, H, L, F]; weight W' [M, D]; keep [B, 1, L] bool or
    None; eps the features' epsilon. Returns the output [B, H, N, E]."""

    @staticmethod
    def forward(ctx, q, k, v1, weight, keep, eps, keep_bytes):
        # subnormals flushed on the CPU (ops/numerics.py); float32 products, as designed
        with flushed_denormals(q.device), torch.autocast(q.device.type, enabled=False):
            return _SoftmaxNoncausal._forward(ctx, q, k, v1, weight, keep, eps, keep_bytes)

    @staticmethod
    def _forward(ctx, q, k, v1, weight, keep, eps, keep_bytes):
        eps_r = eps * weight.shape[0] ** -0.5
        dash_q, shift_q, dash_k, shift_k = _shifts(q, k, weight, keep, eps)
        e_k = _exp(dash_k, shift_k, keep)
        kv = e_k.transpose(-1, -2) @ v1  # [B, H, M, F]
        if eps:
            kv += _eps_rows(eps_r, v1, keep)
        e_q = _exp(dash_q, shift_q, None)
        full = e_q @ kv
        if eps:
            full += kv.sum(dim=-2, keepdim=True).mul_(eps_r)
        den = normaliser(full)
        out = full[..., :-1].div_(den)
        ctx.kept = (e_q.numel() + e_k.numel()) * e_q.element_size() <= keep_bytes
        kept = (e_q, e_k) if ctx.kept else (shift_q, shift_k)
        ctx.save_for_backward(q, k, v1, weight, keep, kv, out, den, *kept)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        # backward runs under the autocast of the caller's .backward() (e.g. the trainer's)
        with flushed_denormals(d_out.device), torch.autocast(d_out.device.type, enabled=False):
            return _SoftmaxNoncausal._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out):
        q, k, v1, weight, keep, kv, out, den, a, b = ctx.saved_tensors
        eps_r = ctx.eps * weight.shape[0] ** -0.5
        if ctx.kept:
            e_q, e_k = a, b
        else:
            e_q, e_k = _exp(q @ weight.T, a, None), _exp(k @ weight.T, b, keep)
        d_full = normalise_backward(d_out, out, den)
        d_kv = e_q.transpose(-1, -2) @ d_full
        if eps_r:
            d_kv += d_full.sum(dim=-2, keepdim=True).mul_(eps_r)
        d_dash_q = (d_full @ kv.transpose(-1, -2)).mul_(e_q)
        d_v1 = e_k @ d_kv
        if eps_r:
            along = d_kv.sum(dim=-2, keepdim=True).mul_(eps_r)  # [B, H, 1, F]
            d_v1 += along if keep is None else along * keep[..., None]
        d_dash_k = (v1 @ d_kv.transpose(-1, -2)).mul_(e_k)
        sq = weight.shape[-1] ** -0.5  # d |x'|^2 / 2 / dx = D^-1/2 x
        dq = (d_dash_q @ weight).sub_(q * (d_dash_q.sum(-1, keepdim=True) * sq))
        dk = (d_dash_k @ weight).sub_(k * (d_dash_k.sum(-1, keepdim=True) * sq))
        return dq, dk, d_v1, None, None, None, None


def softmax_noncausal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    mask: Tensor | None = None,
    eps: float = 0.0,
    keep_bytes: int = KEEP_BYTES,
) -> Tensor:
    """Non-causal FAVOR+ attention of q [B, H, N, D] over k, v [B, H, L, D] with the projection
    W [M, D] and the features' epsilon ``eps``.

    mask: [B, L] key padding (True = keep); keep_bytes: see the module docstring. Returns
    [B, H, N, D] in v's dtype; a query with no unmasked key gets zeros.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q must be [B, H, N, D] and k [B, H, L, D], got {list(q.shape)}, {list(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"v must be [B, H, L, E] with k's [B, H, L] = {list(k.shape[:-1])}, got {list(v.shape)}"
        )
    if projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(f"projection must be [M, D = {q.shape[-1]}], got {list(projection.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    keep = check_key_mask(mask, k)
    dtype = torch.promote_types(v.dtype, torch.float32)
    weight = projection.to(dtype) * q.shape[-1] ** -0.25
    out = _SoftmaxNoncausal.apply(
        q.to(dtype), k.to(dtype), with_ones(v.to(dtype)), weight, keep, float(eps), keep_bytes
    )
    return out.to(v.dtype)
