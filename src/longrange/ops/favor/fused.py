"""Causal FAVOR+ with the softmax kernel fused into the chunked products.

Same maths as :func:`~longrange.ops.favor.features.softmax_query_features` /
:func:`~longrange.ops.favor.features.softmax_key_features` (causal, no epsilon) followed by
:func:`~longrange.ops.favor.chunk.chunk_causal_linear_attention`, but the features are formed
inside one autograd function and formed again in its backward pass, so that only q, k, v and
the running sums before each chunk are kept: the two [B, H, N, M] feature tensors never outlive
the forward pass. With x' = x D^-1/4 and W' = W D^-1/4:
  phi(q) = M^-1/2 exp(q W'^T - max_m q W'^T)          (the query's own max cancels)
  phi(k) = M^-1/2 exp(k W'^T - |k'|^2 / 2 - c)        (c the running max of key log-features)
and the gradient of exp(x W'^T - |x'|^2 / 2 - stop(c)) with respect to x is
  (d_phi o phi) W' - sum_m (d_phi o phi) D^-1/2 x.

Dimensions: B batch, H heads, N positions, G chunks, C chunk size, D head width, M features,
E value width (F = E + 1 with the normaliser column).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longrange.ops.favor.chunk import FavorState, chunk_backward, chunk_forward, split_chunks
from longrange.ops.favor.features import running_log_scale
from longrange.ops.favor.linear import normalise, with_ones


def _query_features(q: Tensor, weight: Tensor, log_ratio: float) -> Tensor:
    dash = q @ weight.T
    return dash.sub_(dash.amax(dim=-1, keepdim=True) - log_ratio).exp_()


def _key_log_features(k: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k W'^T [B, H, G, C, M], |k'|^2 / 2 and the largest log-feature, both [B, H, G, C])."""
    dash = k @ weight.T
    half_sq = k.square().sum(-1) * (weight.shape[-1] ** -0.5 / 2)
    return dash, half_sq, dash.amax(dim=-1) - half_sq


def _key_features(dash, half_sq, row_max, c, keep, log_ratio: float) -> Tensor:
    # a masked key may exceed the running max: its own max keeps its (zeroed) features finite
    shift = torch.maximum(c, row_max) + half_sq - log_ratio
    return dash.sub_(shift[..., None]).exp_().mul_(keep[..., None])


class _SoftmaxCausal(torch.autograd.Function):
    """q, k: [B, H, G, C, D]; v1: [B, H, G, C, F]; weight W' [M, D]; keep [B, 1, G, C] bool;
    kv0 [B, H, M, F] relative to c0 [B, H] (used only when ``has_state``). Returns (the
    unnormalised output [B, H, G, C, F], the final sums, the running stabiliser [B, H, G, C])."""

    @staticmethod
    def forward(ctx, q, k, v1, weight, keep, kv0, c0, has_state: bool):
        log_ratio = -0.5 * math.log(weight.shape[0])
        fq = _query_features(q, weight, log_ratio)
        dash, half_sq, row_max = _key_log_features(k, weight)
        c = running_log_scale(row_max.flatten(2), keep.flatten(2), c0 if has_state else None)
        c = c.view(row_max.shape)
        fk = _key_features(dash, half_sq, row_max, c, keep, log_ratio)
        if not has_state:
            c0 = c[:, :, 0, 0]
        out, final, befores = chunk_forward(fq, fk, v1, c, kv0, c0)
        ctx.save_for_backward(q, k, v1, weight, keep, c, c0, befores)
        ctx.log_ratio = log_ratio
        ctx.mark_non_differentiable(c)
        return out, final, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_final, _d_c):
        q, k, v1, weight, keep, c, c0, befores = ctx.saved_tensors
        scale_sq = weight.shape[-1] ** -0.5
        fq = _query_features(q, weight, ctx.log_ratio)
        fk = _key_features(*_key_log_features(k, weight), c, keep, ctx.log_ratio)
        dfq, dfk, dv1, d_kv0 = chunk_backward(fq, fk, v1, c, c0, befores, d_out, d_final)
        d_dash = dfq.mul_(fq)
        dq = (d_dash @ weight).sub_(q * (d_dash.sum(-1, keepdim=True) * scale_sq))
        d_dash = dfk.mul_(fk)
        dk = (d_dash @ weight).sub_(k * (d_dash.sum(-1, keepdim=True) * scale_sq))
        return dq, dk, dv1, None, None, d_kv0, None, None


def softmax_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int = 128,
    state: FavorState | None = None,
) -> tuple[Tensor, FavorState]:
    """Causal FAVOR+ attention of q, k, v [B, H, N, D] with the projection W [M, D].

    mask: [B, N] key padding (True = keep); state: the running sums to continue. Returns
    (out [B, H, N, D] in v's dtype, the state after the last position).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        shapes = [list(t.shape) for t in (q, k, v)]
        raise ValueError(f"q, k, v must be [B, H, N, D] alike, got {shapes}")
    if projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(f"projection must be [M, D = {q.shape[-1]}], got {list(projection.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, h, n, d = q.shape
    dtype = torch.promote_types(v.dtype, torch.float32)
    m, e1 = projection.shape[0], v.shape[-1] + 1
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (b, n)):
        raise ValueError(f"mask must be a bool tensor [B, N] = {[b, n]}, got {mask.dtype} {list(mask.shape)}")
    if state is not None and (state.kv.shape != (b, h, m, e1) or state.log_scale.shape != (b, h)):
        raise ValueError(f"state must hold kv [{b}, {h}, {m}, {e1}] and log_scale [{b}, {h}]")
    size = min(chunk_size, n)
    keep = (torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask)[:, None]
    keep = split_chunks(keep, size, value=False)  # [B, 1, G, C]: padding is masked
    q, k, v1 = (split_chunks(t, size) for t in (q.to(dtype), k.to(dtype), with_ones(v.to(dtype))))
    weight = projection.to(dtype) * d**-0.25
    if state is None:
        kv0, c0 = q.new_zeros(b, h, m, e1), q.new_zeros(b, h)
    else:
        kv0, c0 = state.kv.to(dtype), state.log_scale.to(dtype)
    out, final, c = _SoftmaxCausal.apply(q, k, v1, weight, keep, kv0, c0, state is not None)
    out = normalise(out.flatten(2, 3)[:, :, :n])
    return out.to(v.dtype), FavorState(final, c.flatten(2)[:, :, n - 1])
