"""Attention of H query heads against one shared key/value head, in blocks of query
positions, with a Toeplitz bias and optional extra logits in the same softmax.

Rows: queries [B, N, H, D] (the query projection's own layout) are N * H rows of D, so a block
of query positions [a, z) is (z - a) * H consecutive rows and every product with the shared
keys or values is one GEMM. The bias is read the same way from ``ToeplitzBias.rows()``
[N, H, M] (a view per block, built once for every layer that shares it), and the output comes
out [B, N, H, D], the layout the output projection reads.

Causality: a causal bias holds the most negative finite number for every key after its
query, so a block [a, z) gives exact zeros to the keys from M - N + z on; they are skipped.
At N = M = 512 in blocks of 128 positions the GEMMs and the passes over the scores cover
5/8 of the square, and a block's scores ([512, <= 512] floats at 4 heads) stay in L2 from
the GEMM through the softmax to the next GEMM. A memorizing chunk at the reference defaults
(512 tokens, 4 layers of 4 heads), forward and backward on the 2-core CPU, in turn: 89.9 ->
82.0 ms against one [H, N, M] score matrix per layer.

Key padding: a key mask [B, M] sets the scores of hidden keys to the most negative finite
number after the bias, as the naive form does, and their gradient to zero. A query that sees
no unhidden key (every key up to it hidden) gets, in the naive form, equal weights over all M
keys and the extra logits; a block holding such a query reads every key so that the two forms
stay equal (the queries before ``bare`` positions of a batch row, found once on the host).

Attention dropout: each block's weights (the extra logits' with them) are multiplied by a
keep mask drawn per block (:func:`keep_mask`) and scaled by 1 / (1 - rate), as ``nn.Dropout``
after the softmax; the masks are kept for the backward pass.

Backward: the weights of each block are kept from the forward pass; the bias's gradient is
the sum of each head's diagonals of the scores' gradient (:func:`diagonal_sums`).

Dimensions: B batch, H heads, N queries (the last N of M positions), M keys, D head width,
K extra logits per query, L = N + M - 1 bias values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.ops.shared_kv.diagonal import diagonal_sums

# rows (query positions x heads) per block: 512 at 4 heads is 128 positions; blocks of 64
# positions ran as fast (4.5 against 4.6 ms at 512 tokens), whole chunks 5.9 ms
BLOCK_ROWS = 512


def _blocks(n: int, m: int, block: int, causal: bool, bare: int = 0):
    """(first, end, keys) per block of query positions; a block that starts before ``bare``
    (it holds a query that sees no unhidden key) reads every key."""
    for a in range(0, n, block):
        z = min(n, a + block)
        yield a, z, m - n + z if causal and a >= bare else m


def _bare_queries(key_mask: Tensor, n: int, m: int) -> list[int]:
    """Per batch row, how many leading queries see no unhidden key under a causal bias (the
    queries are the last n of m positions)."""
    shown = key_mask.any(dim=1)
    first = torch.where(shown, key_mask.int().argmax(dim=1), m)  # the first unhidden key
    return (first - (m - n)).clamp(0, n).tolist()


def keep_mask(weights: Tensor, rate: float) -> Tensor:
    """Which of a block's weights [R, K + E] attention dropout keeps (bool, each with
    probability 1 - rate). Uniform numbers against the rate: 1.7 against 3.1 ms for
    ``bernoulli_`` over [512, 1056] on the 2-core CPU (``F.dropout`` takes 4.6)."""
    return torch.rand_like(weights) >= rate


def _rows(t: Tensor, b: int) -> Tensor:
    """Batch row b of t [B, N, H, X] as N * H rows of X (a view)."""
    return t[b].view(t.shape[1] * t.shape[2], t.shape[3])


class _SharedKV(torch.autograd.Function):
    # Each block reads its rows through 2-D views made once per batch row (a slice each),
    # not by indexing the 4-D tensors again: about 40% fewer operator calls, which at 512
    # queries are a visible part of the op's time
    @staticmethod
    def forward(ctx, q, keys, values, table, memory, rows, scale, causal, block, hidden, bare, dropout):
        b_, n, h, d = q.shape
        m, k = keys.shape[1], memory.shape[-1]
        out = q.new_empty(b_, n, h, d)
        weights = q.new_empty(b_, n, h, k)
        bias_rows = rows.reshape(n * h, m)  # rows are [N, H, M] (a view when contiguous)
        kept, masks = [], []
        for b in range(b_):
            hid, q_b, out_b, keys_t, values_b = hidden[b], _rows(q, b), _rows(out, b), keys[b].t(), values[b]
            memory_b, weights_b = _rows(memory, b), _rows(weights, b)
            for a, z, e in _blocks(n, m, block, causal, bare[b]):
                lo, hi = a * h, z * h
                bias = bias_rows[lo:hi, :e]
                if k:
                    scores = q.new_empty(hi - lo, k + e)
                    scores[:, :k] = memory_b[lo:hi]
                    torch.addmm(bias, q_b[lo:hi], keys_t[:, :e], alpha=scale, out=scores[:, k:])
                else:
                    scores = torch.addmm(bias, q_b[lo:hi], keys_t[:, :e], alpha=scale)
                if hid is not None:
                    scores[:, k:].masked_fill_(hid[:e], -torch.finfo(scores.dtype).max)
                p = scores.softmax(dim=-1)
                used = p
                if dropout:
                    masks.append(keep_mask(p, dropout))
                    used = _dropped(p, masks[-1], dropout)
                torch.mm(used[:, k:], values_b[:e], out=out_b[lo:hi])
                if k:
                    weights_b[lo:hi].copy_(used[:, :k])
                kept.append(p)
        ctx.save_for_backward(q, keys, values, *kept, *masks)
        ctx.setup = scale, causal, block, table.shape, table.dtype, k, hidden, bare, dropout, len(kept)
        if not k:
            ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    def backward(ctx, d_out, d_weights):
        with torch.autocast(d_out.device.type, enabled=False):
            return _SharedKV._backward(ctx, d_out, d_weights)

    @staticmethod
    def _backward(ctx, d_out, d_weights):
        q, keys, values, *saved = ctx.saved_tensors
        scale, causal, block, table_shape, table_dtype, k, hidden, bare, dropout, count = ctx.setup
        kept, masks = iter(saved[:count]), iter(saved[count:])
        need_q, need_k, need_v, need_t, need_m = ctx.needs_input_grad[:5]
        b_, n, h, _ = q.shape
        m = keys.shape[1]
        d_out = d_out.to(q.dtype).contiguous()
        d_weights = None if d_weights is None else d_weights.to(q.dtype).contiguous()
        dq = torch.empty_like(q) if need_q else None
        dk = torch.zeros_like(keys) if need_k else None
        dv = torch.zeros_like(values) if need_v else None
        dt = torch.zeros(h, table_shape[-1], dtype=table_dtype, device=q.device) if need_t else None
        dm = q.new_zeros(b_, n, h, k) if need_m and k else None
        for b in range(b_):
            hid, g_b, q_b, keys_b, values_t = hidden[b], _rows(d_out, b), _rows(q, b), keys[b], values[b].t()
            dw_b = None if d_weights is None else _rows(d_weights, b)
            dq_b = None if dq is None else _rows(dq, b)
            dm_b = None if dm is None else _rows(dm, b)
            dk_b = None if dk is None else dk[b]
            dv_b = None if dv is None else dv[b]
            for a, z, e in _blocks(n, m, block, causal, bare[b]):
                p = next(kept)
                lo, hi = a * h, z * h
                g = g_b[lo:hi]
                if k:
                    dp = q.new_zeros(hi - lo, k + e) if dw_b is None else q.new_empty(hi - lo, k + e)
                    if dw_b is not None:
                        dp[:, :k] = dw_b[lo:hi]
                    torch.mm(g, values_t[:, :e], out=dp[:, k:])
                else:
                    dp = torch.mm(g, values_t[:, :e])
                used = p
                if dropout:
                    keep = next(masks)
                    dp = _dropped(dp, keep, dropout)
                    used = _dropped(p, keep, dropout)
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
                if hid is not None:  # a hidden key's weight may be non-zero (a bare query)
                    ds[:, k:].masked_fill_(hid[:e], 0)
                if dm_b is not None:
                    dm_b[lo:hi].copy_(ds[:, :k])
                local = ds[:, k:]
                if dv_b is not None:
                    dv_b[:e].addmm_(used[:, k:].t(), g)
                if dq_b is not None:
                    torch.mm(local, keys_b[:e], out=dq_b[lo:hi])
                if dk_b is not None:
                    dk_b[:e].addmm_(local.t(), q_b[lo:hi], alpha=scale)
                if dt is not None:
                    diagonal_sums(local, h, a, n, dt)
        if dq is not None:
            dq.mul_(scale)
        return dq, dk, dv, dt, dm, None, None, None, None, None, None, None


def _dropped(x: Tensor, keep: Tensor, rate: float) -> Tensor:
    return x.mul(keep).mul_(1.0 / (1.0 - rate))


def shared_kv_attention_blocked(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    values_table: Tensor,
    rows: Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    memory_logits: Tensor | None = None,
    key_mask: Tensor | None = None,
    dropout: float = 0.0,
    block_rows: int = BLOCK_ROWS,
) -> tuple[Tensor, Tensor | None]:
    """q [B, H, N, D] (any strides; no copy when it is a view of [B, N, H, D]), keys / values
    [B, M, D], ``values_table`` [H, L] the bias values, a row per head (their gradient goes
    there), ``rows`` [N, H, M] the same bias laid out by query position
    (``ToeplitzBias.rows()``), memory_logits [B, H, N, K] | None, key_mask [B, M] bool | None
    (True: a real key), dropout: the attention dropout rate -> out [B, N, H, D] and the memory
    logits' weights [B, N, H, K] (after dropout; None without them)."""
    b, h, n, _ = q.shape
    m = keys.shape[1]
    hidden, bare = [None] * b, [0] * b
    if key_mask is not None:
        bare = _bare_queries(key_mask, n, m) if causal else bare  # without causal, every block reads all
        hidden = [None if bool(row.all()) else ~row for row in key_mask]
    dtype = _dtype(q, keys, values)
    q_rows = q.transpose(1, 2).to(dtype).contiguous()
    if memory_logits is None:
        memory = q_rows.new_empty(b, n, h, 0)
    else:
        memory = memory_logits.transpose(1, 2).to(dtype).contiguous()
    block = max(1, block_rows // h)
    with torch.autocast(q.device.type, enabled=False):
        out, weights = _SharedKV.apply(
            q_rows,
            keys.to(dtype).contiguous(),
            values.to(dtype).contiguous(),
            values_table,
            memory,
            rows.to(dtype),
            scale,
            causal,
            block,
            hidden,
            bare,
            float(dropout),
        )
    return out, None if memory_logits is None else weights


def _dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the products run in: autocast's where it is on (as the naive form's
    matmuls would), else the inputs' common dtype."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
