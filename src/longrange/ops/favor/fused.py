"""Causal FAVOR+ with the softmax kernel fused into the chunked products.

Same maths as :func:`~longrange.ops.favor.features.softmax_query_features` /
:func:`~longrange.ops.favor.features.softmax_key_features` (causal, no epsilon) followed by
:func:`~longrange.ops.favor.chunk.chunk_causal_linear_attention`, in one autograd function
with a hand-written backward. With x' = x D^-1/4 and W' = W D^-1/4:
  phi(q) = M^-1/2 exp(q W'^T - max_m q W'^T)          (the query's own max cancels)
  phi(k) = M^-1/2 exp(k W'^T - |k'|^2 / 2 - c)        (c the running max of key log-features)
and the gradient of exp(x W'^T - |x'|^2 / 2 - stop(c)) with respect to x is
  (d_phi o phi) W' - sum_m (d_phi o phi) D^-1/2 x.

The chunks run in segments of about ``segment_bytes`` of features (a few thousand positions),
so that what a segment forms is still in cache when it is read again: the cost per token
does not grow with the length. What backward needs is chosen by size (``keep_bytes``): while
all the features, the chunks' C x C kernel blocks and their stabiliser factors fit, they are
kept from the forward pass (nothing is formed twice); beyond, only q, k, v, the output and
the running sums before each segment are kept, and backward forms each segment's features
again, segments in reverse, so long inputs keep O(N D) per layer instead of O(N (M + C)).

Dimensions: B batch, H heads, N positions, G chunks, C chunk size, D head width, M features,
E value width (F = E + 1 with the normaliser column).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longrange.ops.favor.chunk import FavorState, chunk_factors, scan_sums, scan_sums_backward, split_chunks
from longrange.ops.favor.features import EMPTY_LOG_SCALE, check_key_mask, running_log_scale
from longrange.ops.favor.linear import normalise, normalise_backward, normaliser, with_ones
from longrange.ops.numerics import exp_normal_, flushed_denormals

# Up to this many bytes of features and kernel blocks per call are kept for backward (the
# bench preset's 64K tokens, the reference defaults' 16K); beyond, backward forms them again.
# The chunks run in segments of about SEGMENT_BYTES of them.
KEEP_BYTES = 320 * 2**20
SEGMENT_BYTES = 16 * 2**20
# Positions per chunk by default: at the Performer's reference defaults (266 features) 64 runs
# 1.04-1.09x faster than 128 from 4K to 16K tokens on CPU; 32 and 96 are slower than 64.
CHUNK_SIZE = 64


def _query_features(q: Tensor, weight: Tensor) -> Tensor:
    fq = q @ weight.T
    return exp_normal_(fq.sub_(fq.amax(dim=-1, keepdim=True) + 0.5 * math.log(weight.shape[0])))


def _key_log_features(k: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(k W'^T [B, H, G, C, M], |k'|^2 / 2 and the largest log-feature, both [B, H, G, C])."""
    dash = k @ weight.T
    half_sq = k.square().sum(-1).mul_(weight.shape[-1] ** -0.5 / 2)
    return dash, half_sq, dash.amax(dim=-1) - half_sq


def _key_features(dash, half_sq, row_max, c, keep: Tensor | None, features: int) -> Tensor:
    # a masked key may exceed the running max: its own max keeps its (zeroed) features finite
    shift = (c if keep is None else torch.maximum(c, row_max)) + half_sq + 0.5 * math.log(features)
    fk = exp_normal_(dash.sub_(shift[..., None]))
    return fk if keep is None else fk.mul_(keep[..., None])


def _segment_forward(q, k, v1, weight, keep, kv0, c0):
    """The chunked pass over one segment of whole chunks: q, k [B, H, G, C, D], v1 [B, H, G,
    C, F] (values and a column of ones), keep [B, 1, G, C] or None, kv0 [B, H, M, F] relative
    to c0 [B, H] (None: a fresh sequence, kv0 zero). Returns (out [B, H, G, C, E], den
    [B, H, G, C, 1], the sums after the segment, c [B, H, G, C], c0, and what backward may
    keep: fq, fk, scores, within, befores)."""
    fq = _query_features(q, weight)
    dash, half_sq, row_max = _key_log_features(k, weight)
    c = running_log_scale(row_max.flatten(2), None if keep is None else keep.flatten(2), c0)
    c = c.view(row_max.shape)
    fk = _key_features(dash, half_sq, row_max, c, keep, weight.shape[0])
    del dash, half_sq, row_max
    c0 = c[:, :, 0, 0] if c0 is None else c0
    within, to_end, from_ref, c_ref, c_end = chunk_factors(c, c0)
    scores = (fq @ fk.transpose(-1, -2)).mul_(within)  # [B, H, G, C, C]
    out = scores @ v1
    kv_chunks = fk.transpose(-1, -2) @ (v1 * to_end)  # [B, H, G, M, F], relative to c_end
    befores, final = scan_sums(kv_chunks, c_ref, c_end, kv0)
    del kv_chunks
    out.addcmul_(fq @ befores, from_ref)
    den = normaliser(out)
    return out[..., :-1] / den, den, final, c, c0, (fq, fk, scores, within, befores)


def _segment_backward(d_out, out, den, d_final, q, k, v1, weight, keep, c, c0, kv0, kept):
    """Gradients of :func:`_segment_forward` with respect to q, k, v1 and kv0, from those of
    its output and its final sums; ``kept`` holds the forward's tensors or is None (then they
    are formed again from q, k, v1, kv0 and the saved stabiliser c)."""
    if kept:
        fq, fk, scores, within, befores = kept
        _, to_end, from_ref, c_ref, c_end = chunk_factors(c, c0, within=False)
    else:
        fq = _query_features(q, weight)
        fk = _key_features(*_key_log_features(k, weight), c, keep, weight.shape[0])
        within, to_end, from_ref, c_ref, c_end = chunk_factors(c, c0)
        befores, _ = scan_sums(fk.transpose(-1, -2) @ (v1 * to_end), c_ref, c_end, kv0)
        scores = None
    d_out = normalise_backward(d_out, out, den)
    d_scores = (d_out @ v1.transpose(-1, -2)).mul_(within)  # [B, H, G, C, C]
    d_read = d_out * from_ref  # the gradient reaching the state reads q_g S_g
    dfq = d_scores @ fk
    _add_product(dfq, d_read, befores.transpose(-1, -2))
    d_after, d_kv0 = scan_sums_backward(fq.transpose(-1, -2) @ d_read, c_ref, c_end, d_final)
    del d_read
    dfk = d_scores.transpose(-1, -2) @ fq
    _add_product(dfk, v1 * to_end, d_after.transpose(-1, -2))  # to_end scales rows: the small side
    del d_scores
    if scores is None:
        scores = (fq @ fk.transpose(-1, -2)).mul_(within)
    dv1 = scores.transpose(-1, -2) @ d_out
    dv1.addcmul_(fk @ d_after, to_end)
    dq = dfq.mul_(fq) @ weight
    d_dash = dfk.mul_(fk)
    dk = (d_dash @ weight).sub_(k * (d_dash.sum(-1, keepdim=True) * weight.shape[-1] ** -0.5))
    return dq, dk, dv1, d_kv0


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b in place for batches [..., R, S] of matrices: the product accumulates as
    it is written (no [..., R, S] temporary, no extra pass over ``out``)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


class _SoftmaxCausal(torch.autograd.Function):
    """q, k: [B, H, G, C, D]; v1: [B, H, G, C, F]; weight W' [M, D]; keep [B, 1, G, C] bool or
    None (nothing masked); kv0 [B, H, M, F] relative to c0 [B, H] (used only when
    ``has_state``). Returns (the output [B, H, G, C, D], the final sums, the running
    stabiliser [B, H, G, C]).

    The chunks run in segments of as many chunks as ``segment_bytes`` of features allow, so
    that a segment's tensors are still in cache when they are read again, at any length. The
    sums before each segment are kept; each segment's features and kernel blocks too while
    all of them fit in ``keep_bytes`` (else backward forms them again, segment by segment in
    reverse)."""

    @staticmethod
    def forward(ctx, q, k, v1, weight, keep, kv0, c0, has_state, keep_bytes, segment_bytes):
        # subnormals flushed on the CPU (ops/numerics.py); float32 products, as designed
        with flushed_denormals(q.device), torch.autocast(q.device.type, enabled=False):
            return _SoftmaxCausal._forward(
                ctx, q, k, v1, weight, keep, kv0, c0, has_state, keep_bytes, segment_bytes
            )

    @staticmethod
    def _forward(ctx, q, k, v1, weight, keep, kv0, c0, has_state, keep_bytes, segment_bytes):
        b, h, g, size, _ = q.shape
        per_chunk = 2 * (weight.shape[0] + size) * size * b * h * q.element_size()
        ctx.kept = per_chunk * g <= keep_bytes
        ctx.step = step = min(g, max(1, segment_bytes // per_chunk))
        kv, c_start = kv0, c0 if has_state else None
        kv_starts, c_starts, cs, outs, dens, kept = [], [], [], [], [], []
        for lo in range(0, g, step):
            seg_q, seg_k, seg_v1, seg_keep = _segment(q, k, v1, keep, lo, step)
            out, den, final, c, c_used, extra = _segment_forward(
                seg_q, seg_k, seg_v1, weight, seg_keep, kv, c_start
            )
            kv_starts.append(kv)
            c_starts.append(c_used)
            outs.append(out)
            dens.append(den)
            cs.append(c)
            if ctx.kept:
                kept += extra
            kv, c_start = final, c[:, :, -1, -1]
        out, den, c = (torch.cat(t, dim=2) if len(t) > 1 else t[0] for t in (outs, dens, cs))
        ctx.save_for_backward(
            q, k, v1, weight, keep, c, out, den, torch.stack(kv_starts), torch.stack(c_starts), *kept
        )
        ctx.mark_non_differentiable(c)
        return out, kv, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_final, _d_c):
        # backward runs under the autocast of the caller's .backward() (e.g. the trainer's)
        with flushed_denormals(d_out.device), torch.autocast(d_out.device.type, enabled=False):
            return _SoftmaxCausal._backward(ctx, d_out, d_final)

    @staticmethod
    def _backward(ctx, d_out, d_final):
        q, k, v1, weight, keep, c, out, den, kv_starts, c_starts, *kept = ctx.saved_tensors
        g, step = q.shape[2], ctx.step
        d_final = torch.zeros_like(kv_starts[0]) if d_final is None else d_final
        grads = []
        for i, lo in reversed(list(enumerate(range(0, g, step)))):
            seg_q, seg_k, seg_v1, seg_keep = _segment(q, k, v1, keep, lo, step)
            dq, dk, dv1, d_final = _segment_backward(
                *(_part(t, lo, step) for t in (d_out, out, den)),
                d_final,
                seg_q,
                seg_k,
                seg_v1,
                weight,
                seg_keep,
                _part(c, lo, step),
                c_starts[i],
                kv_starts[i],
                kept[5 * i : 5 * i + 5] if ctx.kept else None,
            )
            grads.append((dq, dk, dv1))
        dq, dk, dv1 = (torch.cat(t[::-1], dim=2) if len(t) > 1 else t[0] for t in zip(*grads))
        return dq, dk, dv1, None, None, d_final, None, None, None, None


def _part(t: Tensor, lo: int, step: int) -> Tensor:
    """Chunks lo .. lo + step of t [B, H | 1, G, ...], laid out contiguously (a slice of the
    chunk dimension is not, and every product would otherwise copy it again)."""
    return t if step >= t.shape[2] else t[:, :, lo : lo + step].contiguous()


def _segment(q, k, v1, keep, lo: int, step: int):
    return (
        _part(q, lo, step),
        _part(k, lo, step),
        _part(v1, lo, step),
        None if keep is None else _part(keep, lo, step),
    )


def softmax_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    state: FavorState | None = None,
    keep_bytes: int = KEEP_BYTES,
    segment_bytes: int = SEGMENT_BYTES,
) -> tuple[Tensor, FavorState]:
    """Causal FAVOR+ attention of q, k, v [B, H, N, D] with the projection W [M, D].

    mask: [B, N] key padding (True = keep); state: the running sums to continue; keep_bytes:
    see the module docstring. Returns (out [B, H, N, D] in v's dtype, the state after the last
    position).
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
    check_key_mask(mask, k)
    if state is not None and (state.kv.shape != (b, h, m, e1) or state.log_scale.shape != (b, h)):
        raise ValueError(f"state must hold kv [{b}, {h}, {m}, {e1}] and log_scale [{b}, {h}]")
    size = min(chunk_size, n)
    keep = None
    if mask is not None or n % size:
        # padding positions past the end are masked keys, so they stay out of the final sums
        keep = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
        keep = split_chunks(keep[:, None], size, value=False)  # [B, 1, G, C]
    # the ones column first: the concatenation also lays out a strided v contiguously
    q, k, v1 = (split_chunks(t, size) for t in (q.to(dtype), k.to(dtype), with_ones(v.to(dtype))))
    weight = projection.to(dtype) * d**-0.25
    if state is None:
        kv0, c0 = q.new_zeros(b, h, m, e1), q.new_zeros(b, h)
    else:
        kv0, c0 = state.kv.to(dtype), state.log_scale.to(dtype)
    out, final, c = _SoftmaxCausal.apply(
        q, k, v1, weight, keep, kv0, c0, state is not None, keep_bytes, segment_bytes
    )
    out = out.flatten(2, 3)
    if out.shape[2] != n:
        out = out[:, :, :n]
    return out.to(v.dtype), FavorState(final, c.flatten(2)[:, :, n - 1])


def softmax_causal_step(
    q: Tensor, k: Tensor, v: Tensor, projection: Tensor, state: FavorState
) -> tuple[Tensor, FavorState]:
    """One decoding position of causal FAVOR+: q, k, v [B, H, 1, D] after the running sums
    ``state`` -> (out [B, H, 1, D] in v's dtype, the new state; ``state`` is not changed).

    The maths of :func:`~longrange.ops.favor.features.softmax_query_features`,
    :func:`~longrange.ops.favor.features.softmax_key_features` (causal, continuing from the
    state's stabiliser) and :func:`~longrange.ops.favor.chunk.causal_linear_attention_step`,
    its reference, with the query and the key projected as one [2, D] block: about half the
    operator calls, which are most of a decoding step's time."""
    if q.dim() != 4 or q.shape[-2] != 1 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        shapes = [list(t.shape) for t in (q, k, v)]
        raise ValueError(f"q, k, v must be [B, H, 1, D] alike, got {shapes}")
    d, m = q.shape[-1], projection.shape[0]
    if projection.dim() != 2 or projection.shape[1] != d:
        raise ValueError(f"projection must be [M, D = {d}], got {list(projection.shape)}")
    dtype = state.kv.dtype
    if state.kv.shape != (*q.shape[:2], m, v.shape[-1] + 1) or state.log_scale.shape != q.shape[:2]:
        raise ValueError(
            f"state must hold kv [{q.shape[0]}, {q.shape[1]}, {m}, {v.shape[-1] + 1}] and log_scale "
            f"{list(q.shape[:2])}"
        )
    x = torch.cat((q, k), dim=-2).to(dtype)  # [B, H, 2, D]: the query, then the key
    scale = d**-0.25
    with torch.autocast(x.device.type, enabled=False):
        dash = x @ (projection.to(dtype) * scale).T  # [B, H, 2, M]
    half_sq = x.square().sum(-1, keepdim=True) * (scale**2 / 2)
    row_max = dash.amax(dim=-1, keepdim=True) - half_sq  # the largest log-feature of each
    c = torch.maximum(state.log_scale[..., None, None], row_max[..., 1:, :]).clamp_min_(EMPTY_LOG_SCALE)
    # the query's own max (it cancels); the key's running stabiliser
    shift = half_sq + torch.cat((row_max[..., :1, :], c), dim=-2) + 0.5 * math.log(m)
    feats = exp_normal_(dash.sub_(shift))
    fq, fk = feats[..., :1, :], feats[..., 1:, :]
    kv = state.kv * torch.exp(state.log_scale - c[..., 0, 0])[..., None, None]
    kv.addcmul_(fk.transpose(-1, -2), with_ones(v.to(dtype)))  # + phi(k)^T [v, 1]
    return normalise(fq @ kv).to(v.dtype), FavorState(kv, c[..., 0, 0])
