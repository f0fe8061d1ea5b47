"""Causal linear attention in chunks (docs/CAUSALITY.md, "FAVOR+: chunked causal sums"), and
its one-token decoding step.

The sequence is cut into G chunks of C positions. Inside a chunk the kernel matrix is formed
explicitly, (phi(Q) phi(K)^T o causal mask) [V, 1], a C x C product; across chunks each query
reads the running sums S = sum over earlier chunks of phi(k)^T [v, 1] ([M, E + 1] per head, the
last column being the normaliser z). Memory is O(N (M + E) + N C + (N / C) M E), never an
(N, M, E) tensor; FLOPs O(N C (M + E) + N M E).

Stabiliser (docs/CAUSALITY.md, "FAVOR+: the stabiliser"): key features arrive divided by
exp(c_i), c the running maximum of the key log-features (``log_scale``, non-decreasing in
i). A query at t weighs key i <= t by exp(c_i - c_t) <= 1, so every term it sees is relative
to the stabiliser of its own prefix;
the running sums are kept relative to the last chunk's stabiliser and rescaled by
exp(c_old - c_new) <= 1 when it grows, as online softmax does. Nothing ever overflows, and the
output at t is a function of positions <= t only, bit for bit.

Dimensions: B batch, H heads, N positions, G chunks, C chunk size, M features, E value width.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.favor.linear import normalise, with_ones
from longrange.ops.numerics import exp_normal_, masked_exp_


@dataclass
class FavorState:
    """Running sums of causal FAVOR+ after some prefix.

    kv: [B, H, M, E + 1], sum over the prefix of exp(c_i - c) phi(k_i)^T [v_i, 1];
    log_scale: [B, H], the stabiliser c those sums are relative to.
    """

    kv: Tensor
    log_scale: Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, features: int, value_dim: int, like: Tensor) -> FavorState:
        from longrange.ops.favor.features import EMPTY_LOG_SCALE

        kv = like.new_zeros(batch, heads, features, value_dim + 1, dtype=torch.float32)
        return cls(kv, like.new_full((batch, heads), EMPTY_LOG_SCALE, dtype=torch.float32))


def _check(q: Tensor, k: Tensor, v: Tensor, log_scale: Tensor | None, state: FavorState | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q, k must be [B, H, N, M] alike and v [B, H, N, E], got {list(q.shape)}, "
            f"{list(k.shape)}, {list(v.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if log_scale is not None and log_scale.shape != q.shape[:-1]:
        raise ValueError(f"log_scale must be [B, H, N] = {list(q.shape[:-1])}, got {list(log_scale.shape)}")
    if state is not None:
        b, h, _, m = q.shape
        if state.kv.shape != (b, h, m, v.shape[-1] + 1) or state.log_scale.shape != (b, h):
            raise ValueError(
                f"state must hold kv [{b}, {h}, {m}, {v.shape[-1] + 1}] and log_scale [{b}, {h}], got "
                f"{list(state.kv.shape)} and {list(state.log_scale.shape)}"
            )


def _block_size(g: int) -> int:
    """About sqrt(g) chunks per block, a divisor of g where one is near (no padding)."""
    root = math.isqrt(g - 1) + 1 if g > 1 else 1
    for size in range(root, 2 * root + 1):
        if g % size == 0:
            return size
    return root


def _scan_plan(c_ref: Tensor, c_end: Tensor, block: int | None):
    """The factors of the two-level scan over G chunks in blocks of ``block`` (about sqrt(G)),
    padded to whole blocks (padding chunks repeat the last stabiliser, so every factor stays
    <= 1). Returns (block, blocks, pad, P [B, H, K, b, b] exp(c_end_j - c_ref_g) for j < g in a
    block, t [B, H, K, b] exp(c_end_j - e) with e the block's last c_end, Q [B, H, K + 1, K]
    exp(e_j - e_prev_i) for blocks j < i, q0 [B, H, K + 1] exp(c0 - e_prev_i), r [B, H, K, b]
    exp(e_prev - c_ref_g)), where e_prev_i is the stabiliser before block i (c0 for the first)."""
    g = c_end.shape[-1]
    size = block or _block_size(g)
    blocks = -(-g // size)
    pad = blocks * size - g
    c0 = c_ref[..., :1]
    if pad:
        last = c_end[..., -1:].expand(*c_end.shape[:-1], pad)
        c_ref, c_end = torch.cat((c_ref, last), dim=-1), torch.cat((c_end, last), dim=-1)
    cr = c_ref.unflatten(-1, (blocks, size))
    ce = c_end.unflatten(-1, (blocks, size))
    strict = torch.ones(size, size, dtype=torch.bool, device=c_end.device).tril(-1)
    within = masked_exp_(ce[..., None, :] - cr[..., :, None], strict)
    e = ce[..., -1]
    to_end = exp_normal_(ce - e[..., None])
    e_prev = torch.cat((c0, e), dim=-1)
    earlier = torch.ones(blocks + 1, blocks, dtype=torch.bool, device=c_end.device).tril(-1)
    across = masked_exp_(e[..., None, :] - e_prev[..., :, None], earlier)
    from_start = exp_normal_(c0 - e_prev)
    into = exp_normal_(e_prev[..., :-1, None] - cr)
    return size, blocks, pad, within, to_end, across, from_start, into


def scan_sums(
    x: Tensor, c_ref: Tensor, c_end: Tensor, initial: Tensor, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """The running sums before every chunk and after the last.

    x: [B, H, G, M, F], chunk g's sums relative to c_end[g]; c_ref[g] = c_end[g - 1] (c_ref[0]
    the stabiliser of ``initial`` [B, H, M, F]). Returns (S [B, H, G, M, F] with
    S_g = sum_{j<g} exp(c_end_j - c_ref_g) x_j + exp(c_ref_0 - c_ref_g) initial, relative to
    c_ref[g]; the final sums relative to c_end[-1]). Every factor is formed pairwise and is
    <= 1.

    Two forms, the same sums: on CPU (``block`` None, no autograd through it, not compiling)
    :func:`_scan_in_turn`; else two levels with no loop: the sums inside blocks of ``block``
    chunks (one batched product), then across the blocks' totals (one product), then each
    chunk adds its block's carry.
    """
    if _in_turn(x, initial, block):
        return _scan_in_turn(x, _decay(c_ref, c_end), initial)
    b, h, g, m, f = x.shape
    size, blocks, pad, within, to_end, across, from_start, into = _scan_plan(c_ref, c_end, block)
    flat = x.reshape(b, h, g, m * f)
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
    flat = flat.view(b, h, blocks, size, m * f)
    totals = (to_end[..., None, :] @ flat).squeeze(-2)  # [B, H, K, MF], relative to each e
    carries = across @ totals  # [B, H, K + 1, MF]: before each block, and after the last
    carries.addcmul_(from_start[..., None], initial.reshape(b, h, 1, m * f))
    out = (within @ flat).addcmul_(into[..., None], carries[:, :, :-1, None])
    out = out.view(b, h, blocks * size, m * f)[:, :, :g]
    return out.reshape(x.shape), carries[:, :, -1].reshape(initial.shape)


def _in_turn(x: Tensor, initial: Tensor, block: int | None) -> bool:
    return (
        block is None
        and x.device.type == "cpu"
        and not (x.requires_grad or initial.requires_grad)
        and not torch.compiler.is_compiling()
    )


def _decay(c_ref: Tensor, c_end: Tensor) -> Tensor:
    """exp(c_ref_g - c_end_g) <= 1 [B, H, G, 1, 1]: what the sums before chunk g are worth
    relative to the stabiliser after it."""
    return exp_normal_(c_ref - c_end)[..., None, None]


def _scan_in_turn(x: Tensor, decay: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`scan_sums` chunk after chunk, S_{g+1} = decay_g S_g + x_g, each step one fused
    multiply-add written in place into the output. It reads each chunk's sums once, where the
    two-level form reads and writes them about four times; on CPU, for the Performer's
    segments of 24 chunks of [4, 266, 65] sums, 1.0 -> 0.59 ms (its backward 1.11 -> 0.61)."""
    g = x.shape[2]
    out = torch.empty_like(x)
    out[:, :, 0] = initial
    for j in range(g - 1):
        torch.addcmul(x[:, :, j], out[:, :, j], decay[:, :, j], out=out[:, :, j + 1])
    return out, torch.addcmul(x[:, :, -1], out[:, :, -1], decay[:, :, -1])


def _scan_in_turn_backward(grads: Tensor, decay: Tensor, d_final: Tensor) -> tuple[Tensor, Tensor]:
    """The adjoint of :func:`_scan_in_turn`, chunk after chunk backwards:
    dX_{g-1} = grads_g + decay_g dX_g, from dX_{G-1} = d_final."""
    g = grads.shape[2]
    dx = torch.empty_like(grads)
    dx[:, :, -1] = d_final
    for j in range(g - 1, 0, -1):
        torch.addcmul(grads[:, :, j], dx[:, :, j], decay[:, :, j], out=dx[:, :, j - 1])
    return dx, torch.addcmul(grads[:, :, 0], dx[:, :, 0], decay[:, :, 0])


def scan_sums_backward(
    grads: Tensor, c_ref: Tensor, c_end: Tensor, d_final: Tensor, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """Adjoint of :func:`scan_sums`: from the gradients of S [B, H, G, M, F] and of the final
    sums, the gradients of x (dX_g = sum_{j>g} exp(c_end_g - c_ref_j) grads_j + exp(c_end_g -
    c_end_last) d_final) and of ``initial``; chunk after chunk backwards where
    :func:`scan_sums` runs in turn (dX_{g-1} = grads_g + decay_g dX_g)."""
    if _in_turn(grads, d_final, block):
        return _scan_in_turn_backward(grads, _decay(c_ref, c_end), d_final)
    b, h, g, m, f = grads.shape
    size, blocks, pad, within, to_end, across, from_start, into = _scan_plan(c_ref, c_end, block)
    flat = grads.reshape(b, h, g, m * f)
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
    flat = flat.view(b, h, blocks, size, m * f)
    d_carries = torch.cat(((into[..., None, :] @ flat).squeeze(-2), d_final.reshape(b, h, 1, m * f)), dim=2)
    d_totals = across.transpose(-1, -2) @ d_carries  # [B, H, K, MF]
    d_initial = (from_start[..., None, :] @ d_carries).squeeze(-2)
    dx = (within.transpose(-1, -2) @ flat).addcmul_(to_end[..., None], d_totals[:, :, :, None])
    dx = dx.view(b, h, blocks * size, m * f)[:, :, :g]
    return dx.reshape(grads.shape), d_initial.reshape(d_final.shape)


@functools.lru_cache(maxsize=16)
def _tril(size: int, device: torch.device) -> Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def chunk_factors(c: Tensor, c0: Tensor, *, within: bool = True) -> tuple[Tensor | None, ...]:
    """The stabiliser ratios of a chunked pass, all <= 1: within [B, H, G, C, C] exp(c_i - c_t)
    for i <= t (row t, column i; else 0; None unless ``within``); to_end [B, H, G, C, 1]
    exp(c_i - c_end); from_ref exp(c_ref - c_t); and c_ref, c_end [B, H, G] (the stabilisers
    of the sums before and after each chunk)."""
    block = masked_exp_(c[..., None, :] - c[..., :, None], _tril(c.shape[-1], c.device)) if within else None
    c_end = c[..., -1]
    c_ref = torch.cat((c0[..., None], c_end[..., :-1]), dim=-1)
    to_end = exp_normal_(c - c_end[..., None])[..., None]
    from_ref = exp_normal_(c_ref[..., None] - c)[..., None]
    return block, to_end, from_ref, c_ref, c_end


def chunk_forward(q: Tensor, k: Tensor, v1: Tensor, c: Tensor, kv0: Tensor, c0: Tensor):
    """The chunked causal products (no autograd): q, k [B, H, G, C, M], v1 [B, H, G, C, F],
    c [B, H, G, C] non-decreasing, kv0 [B, H, M, F] relative to c0 [B, H]. Returns the
    unnormalised output [B, H, G, C, F], the final sums [B, H, M, F] (relative to c at the last
    position) and the sums before every chunk [B, H, G, M, F] (kept for the backward pass)."""
    within, to_end, from_ref, c_ref, c_end = chunk_factors(c, c0)
    out = (q @ k.transpose(-1, -2)).mul_(within) @ v1
    kv_chunks = k.transpose(-1, -2) @ (v1 * to_end)  # [B, H, G, M, F], relative to c_end
    befores, final = scan_sums(kv_chunks, c_ref, c_end, kv0)
    out.addcmul_(q @ befores, from_ref)
    return out, final, befores


def chunk_backward(q, k, v1, c, c0, befores, d_out: Tensor, d_final: Tensor | None):
    """Gradients of :func:`chunk_forward`'s output and final sums with respect to q, k, v1 and
    kv0; the C x C blocks are recomputed rather than stored."""
    within, to_end, from_ref, c_ref, c_end = chunk_factors(c, c0)
    d_final = torch.zeros_like(befores[:, :, 0]) if d_final is None else d_final
    d_scores = (d_out @ v1.transpose(-1, -2)).mul_(within)  # [B, H, G, C, C]
    d_read = d_out * from_ref  # the gradient reaching the state reads q_g S_g
    dq = d_scores @ k
    dq += d_read @ befores.transpose(-1, -2)
    d_after, d_kv0 = scan_sums_backward(q.transpose(-1, -2) @ d_read, c_ref, c_end, d_final)
    dk = d_scores.transpose(-1, -2) @ q
    dk.addcmul_(v1 @ d_after.transpose(-1, -2), to_end)
    del d_scores
    scores = (q @ k.transpose(-1, -2)).mul_(within)
    dv1 = scores.transpose(-1, -2) @ d_out
    dv1.addcmul_(k @ d_after, to_end)
    return dq, dk, dv1, d_kv0


class _ChunkCausal(torch.autograd.Function):
    """:func:`chunk_forward` with a hand-written backward, so only the inputs and the running
    sums before each chunk [B, H, G, M, E + 1] are kept for it."""

    @staticmethod
    def forward(ctx, q, k, v1, c, kv0, c0):
        with torch.autocast(q.device.type, enabled=False):  # float32 products, as designed
            out, final, befores = chunk_forward(q, k, v1, c, kv0, c0)
        ctx.save_for_backward(q, k, v1, c, c0, befores)
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_final):
        q, k, v1, c, c0, befores = ctx.saved_tensors
        # backward runs under the autocast of the caller's .backward() (e.g. the trainer's)
        with torch.autocast(d_out.device.type, enabled=False):
            dq, dk, dv1, d_kv0 = chunk_backward(q, k, v1, c, c0, befores, d_out, d_final)
        return dq, dk, dv1, None, d_kv0, None


def split_chunks(t: Tensor, size: int, value: float = 0.0) -> Tensor:
    """[B, H, N, ...] -> [B, H, G, C, ...], padding N up to G * C with ``value``."""
    n = t.shape[2]
    pad = -n % size
    if pad:
        spec = [0, 0] * (t.dim() - 3) + [0, pad]
        t = F.pad(t, spec, value=value)
    return t.reshape(*t.shape[:2], t.shape[2] // size, size, *t.shape[3:])


def chunk_causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_scale: Tensor | None = None,
    chunk_size: int = 128,
    state: FavorState | None = None,
) -> tuple[Tensor, FavorState]:
    """Causal linear attention; q, k: [B, H, N, M] features, v: [B, H, N, E].

    log_scale: [B, H, N], the running stabiliser the key features were computed with (None:
    features carry no stabiliser). state: the running sums of an earlier prefix to continue.
    Returns (out [B, H, N, E], state after the last position). Computed in float32 (float64
    for float64 inputs); the output has v's dtype.
    """
    _check(q, k, v, log_scale, state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = torch.promote_types(v.dtype, torch.float32)
    b, h, n, m = q.shape
    q, k, v1 = q.to(dtype), k.to(dtype), with_ones(v.to(dtype))
    e1 = v1.shape[-1]
    if n == 0:  # no positions: nothing to attend, the state goes on as it came
        start = state if state is not None else FavorState.empty(b, h, m, e1 - 1, like=q)
        # v itself is the empty output [B, H, 0, E]: a copy keeps it in the autograd graph
        return v.clone(), FavorState(start.kv.to(dtype), start.log_scale.to(dtype))
    c = log_scale.detach().to(dtype) if log_scale is not None else q.new_zeros(b, h, n)
    if state is not None:
        kv0, c0 = state.kv.to(dtype), state.log_scale.to(dtype)
    else:
        kv0, c0 = q.new_zeros(b, h, m, e1), c[..., 0]
    size = min(chunk_size, n)
    if n % size:
        # padded positions repeat the last stabiliser, so that c stays non-decreasing
        c = torch.cat((c, c[..., -1:].expand(b, h, -n % size)), dim=-1)
    q, k, v1 = (split_chunks(t, size) for t in (q, k, v1))
    out, final = _ChunkCausal.apply(q, k, v1, c.reshape(b, h, q.shape[2], size), kv0, c0)
    out = normalise(out.flatten(2, 3)[:, :, :n])
    final_scale = c[..., -1] if log_scale is not None or state is None else state.log_scale
    return out.to(v.dtype), FavorState(final, final_scale)


def causal_linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: FavorState, *, log_scale=None):
    """One new position: q, k [B, H, 1, M] features, v [B, H, 1, E], log_scale [B, H, 1] (the
    stabiliser k was computed with, >= the state's). Returns (out [B, H, 1, E], new state)."""
    _check(q, k, v, log_scale, state)
    if q.shape[-2] != 1:
        raise ValueError(f"a step takes one position, got {q.shape[-2]}")
    dtype = state.kv.dtype
    kv = state.kv
    if log_scale is None:
        scale = state.log_scale
    else:
        scale = log_scale[..., 0].to(dtype)
        kv = kv * torch.exp(state.log_scale - scale)[..., None, None]
    kv = kv + k.to(dtype).transpose(-1, -2) @ with_ones(v.to(dtype))
    out = normalise(q.to(dtype) @ kv)
    return out.to(v.dtype), FavorState(kv, scale)
