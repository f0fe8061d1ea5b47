"""Causal Sinkhorn bucket attention chunk by chunk with a lean backward (the CPU fast path).

Same maths as :func:`~longrange.ops.sinkhorn.bucketed.causal_sinkhorn_attention` without a
padding mask: query bucket u attends to its P picked buckets (key bucket j < u, or a null
bucket; each scaled by its pick weight, keys and values alike) and to its own bucket up to
the query; in the rows that hold a shifted sequence the last bucket wraps around (row 0
sees the picks and itself, rows 1.. their own keys from row 1 up to themselves).

The gathered path writes the [R, U, (P + 1) * S, D] keys and values of every bucket at
once and autograd keeps them (three times k and v). Here they are one ``index_select`` per
chunk of buckets from a table of [buckets; null buckets] rows, scaled in place, read by the
fused CPU flash kernel and dropped. Backward rebuilds them per chunk from k, v, the picks
and the weights (all it saves, with q, the output and the log-sum-exp), runs the kernel's
backward, and sends the gradients of the gathered rows back to the table with one
``index_add_`` (own buckets, picks and null buckets alike).

Dimensions: R rows (batch x heads), U buckets of S positions, P picks per bucket, D head
width, G buckets per chunk, M = (P + 1) * S keys per bucket.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.dense import cpu_flash_supported

# buckets per chunk: the gathered keys and values of one chunk stay a few megabytes
CHUNK_QUERIES = 2048


def picked_supported(q: Tensor, v: Tensor) -> bool:
    """Whether :func:`causal_picked_attention` runs for tensors like these."""
    return cpu_flash_supported(q) and v.shape[-1] == q.shape[-1]


def _table(x: Tensor, null: Tensor) -> Tensor:
    """[R * U + R, S * D]: the buckets of x [R, U, S, D], then each row's null bucket (null
    [R, D] repeated over a bucket), so that every pick is one row."""
    r, u, s, d = x.shape
    nulls = null.to(x.dtype)[:, None, :].expand(r, s, d).reshape(r, s * d)
    return torch.cat([x.reshape(r * u, s * d), nulls])


def _gathered(table: Tensor, rows: Tensor, weights: Tensor, chunk: slice, shape: tuple[int, ...]) -> Tensor:
    """What the kernel reads for the buckets of ``chunk``: [R, G, M, D], the P picks scaled
    by their weights, then the own bucket. rows [R, U, P + 1]: table rows (picks, own)."""
    r, s, d = shape
    picked = rows[:, chunk]
    count, p = picked.shape[1], picked.shape[2] - 1
    out = table.index_select(0, picked.reshape(-1)).view(r, count, p + 1, s, d)
    out[:, :, :p].mul_(weights[:, chunk, :, None, None].to(out.dtype))
    return out.view(r, count, (p + 1) * s, d)


def _pieces(u: int, s: int, wrapped: bool) -> list[tuple[slice, bool]]:
    """Chunks of buckets (slice, is the wrapped last bucket): the last bucket on its own when
    some rows wrap, since its mask differs."""
    step = max(1, CHUNK_QUERIES // s)
    stop = u - 1 if wrapped else u
    pieces = [(slice(a, min(a + step, stop)), False) for a in range(0, stop, step)]
    return [*pieces, (slice(u - 1, u), True)] if wrapped else pieces


class _PickedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, null_k, null_v, rows, weights, bias, last_bias, scale):
        r, u, s, d = q.shape
        out = torch.empty_like(q)
        lse = q.new_empty(r, u, s, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        k_table, v_table = _table(k, null_k), _table(v, null_v)
        for chunk, last in _pieces(u, s, last_bias is not None):
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, chunk],
                _gathered(k_table, rows, weights, chunk, (r, s, d)),
                _gathered(v_table, rows, weights, chunk, (r, s, d)),
                attn_mask=last_bias if last else bias,
                scale=scale,
            )
            out[:, chunk] = o
            lse[:, chunk] = l
        ctx.save_for_backward(q, k, v, null_k, null_v, rows, weights, bias, last_bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, null_k, null_v, rows, weights, bias, last_bias, out, lse = ctx.saved_tensors
        r, u, s, d = q.shape
        p = rows.shape[-1] - 1
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_w = torch.empty_like(weights)
        k_table, v_table = _table(k, null_k), _table(v, null_v)
        grad_k_table, grad_v_table = torch.zeros_like(k_table), torch.zeros_like(v_table)
        for chunk, last in _pieces(u, s, last_bias is not None):
            keys = _gathered(k_table, rows, weights, chunk, (r, s, d))
            values = _gathered(v_table, rows, weights, chunk, (r, s, d))
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[:, chunk],
                q[:, chunk],
                keys,
                values,
                out[:, chunk],
                lse[:, chunk],
                0.0,
                False,
                attn_mask=last_bias if last else bias,
                scale=ctx.scale,
            )
            grad_q[:, chunk] = gq
            count = gq.shape[1]
            w = weights[:, chunk]
            index = rows[:, chunk].reshape(-1)
            gw = None
            for table, g, grad_table in ((k_table, gk, grad_k_table), (v_table, gv, grad_v_table)):
                g = g.reshape(r, count, p + 1, s * d)
                # d weight = grad . unweighted source (read again from the table)
                src = table.index_select(0, rows[:, chunk, :p].reshape(-1)).view(r, count, p, s * d)
                part = torch.linalg.vecdot(g[:, :, :p], src)
                gw = part if gw is None else gw + part
                g[:, :, :p].mul_(w[..., None].to(g.dtype))  # d unweighted source
                grad_table.index_add_(0, index, g.reshape(-1, s * d))
            grad_w[:, chunk] = gw.to(weights.dtype)
        r_u = r * u
        grad_k, grad_v = grad_k_table[:r_u].view(r, u, s, d), grad_v_table[:r_u].view(r, u, s, d)
        grad_nk = grad_k_table[r_u:].view(r, s, d).sum(dim=1).to(null_k.dtype)
        grad_nv = grad_v_table[r_u:].view(r, s, d).sum(dim=1).to(null_v.dtype)
        return grad_q, grad_k, grad_v, grad_nk, grad_nv, None, grad_w, None, None, None


def causal_picked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    null_k: Tensor,
    null_v: Tensor,
    picks: Tensor,
    weights: Tensor,
    *,
    scale: float,
    wrapped_rows: Tensor | None = None,
) -> Tensor:
    """q, k, v [R, U, S, D]; null_k, null_v [R, D]; picks [R, U, P] (a key bucket j < u, or -1
    for the null bucket), weights [R, U, P]; wrapped_rows [R] bool: the rows whose last
    bucket wraps (None: no row). Returns [R, U, S, D] (module docstring)."""
    r, u, s, _ = q.shape
    p = picks.shape[-1]
    at = torch.arange(s, device=q.device)
    own = at[None, :] <= at[:, None]
    allowed = torch.cat([torch.ones(s, p * s, dtype=torch.bool, device=q.device), own], dim=-1)

    def additive(keep: Tensor) -> Tensor:
        return torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))

    last_bias = None
    if wrapped_rows is not None:
        wrapped = allowed.clone()
        wrapped[1:, : p * s + 1] = False
        last_bias = additive(torch.where(wrapped_rows[:, None, None, None], wrapped, allowed))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # table rows: bucket j of row i is i * U + j; the null bucket of row i is R * U + i
    index = torch.arange(r, device=q.device)[:, None, None]
    rows = torch.where(picks < 0, r * u + index, index * u + picks)
    rows = torch.cat([rows, index * u + torch.arange(u, device=q.device)[:, None]], dim=-1)  # + own
    return _PickedAttention.apply(q, k, v, null_k, null_v, rows, weights, additive(allowed), last_bias, scale)
