"""Blocked attention over overlapping key spans of a token order, with a lean backward.

The fast path of the Routing Transformer's attention on the CPU, both for its routed heads
(tokens in (cluster, position) order, :func:`causal_routed_attention_spans`) and its local
heads (tokens in time order, every token in one group):

- queries come in blocks of Q; block p meets the keys at positions [p * Q, p * Q + S) of the
  key sequence padded in front by F = L * Q positions (S = (L + 1) * Q). Those spans are
  strided views of one tensor (``unfold``), so keys and values are never copied per block;
- query i may see key j of its span when ``groups[i] == groups[j]`` (a cluster; padding has
  a group of its own) and ``band`` allows their distance (a [Q, S] pattern per head);
- memory keys that differ per query (a cluster's memory key/value) are merged with the
  span's result through its log-sum-exp: with w = exp(lse) for the span and exp(m_k) for the
  memory logits, out = (w * out_span + sum_k exp(m_k) mv_k) / (w + sum_k exp(m_k));
- forward and backward run the fused CPU flash kernels in chunks of blocks, so the masks
  and the gradients of the spans exist one chunk at a time. The backward saves q, k, v, the
  output and the log-sum-exp only: the span kernel's gradient with the merged output is
  exact when its incoming gradient is scaled by the span's share of the softmax mass
  (dS = share * P * (dO . v - dO . out)), and the span gradients are folded back onto the
  keys with L + 1 strided adds.

The kernels are the CPU ones (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
backward); :func:`span_attention_supported` says when this path applies. Dropout is not
supported (the callers keep their plain path for it).

Dimensions: R rows (batch x heads), T sorted length (a multiple of Q), F front padding,
Q block size, L look-back blocks, S = (L + 1) * Q keys per span, K memory keys per query,
D head width, E value width, G blocks per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longrange.ops.dense import additive_mask, cpu_flash_supported
from longrange.ops.routing.order import NO_CLUSTER, default_block_size, sort_by_cluster

# queries per chunk: the masks and span gradients of one chunk stay a few megabytes
CHUNK_QUERIES = 2048


def span_attention_supported(q: Tensor) -> bool:
    """Whether :func:`span_attention` runs for tensors like ``q`` (the CPU flash kernels)."""
    return cpu_flash_supported(q)


def _chunk_bias(
    groups: Tensor | None,
    band: Tensor,
    start: int,
    count: int,
    block: int,
    span: int,
    front: int,
    valid: int | None,
) -> Tensor:
    """The additive mask (0 or -inf) of blocks start .. start + count, [R or 1, G or 1, Q, S];
    ``band`` is the [R or 1, Q, S] additive pattern of allowed distances. Without groups only
    the padding is masked: the front (in the first look-back blocks) and, when ``valid`` is
    given, the keys from ``front + valid`` on (in the last blocks)."""
    if groups is None:
        end = None if valid is None else front + valid
        edges = [
            p
            for p in range(start, start + count)
            if p * block < front or (end is not None and p * block + span > end)
        ]
        if not edges:
            return band[:, None]
        bias = band[:, None].repeat(1, count, 1, 1)
        for p in edges:
            bias[:, p - start, :, : max(0, front - p * block)] = float("-inf")
            if end is not None:
                bias[:, p - start, :, max(0, end - p * block) :] = float("-inf")
        return bias
    r = groups.shape[0]
    g_q = groups[:, front + start * block : front + (start + count) * block].view(r, count, block, 1)
    g_k = _spans(groups[..., None], start, count, block, span)[..., 0]
    return torch.where(g_q == g_k[:, :, None, :], band[:, None], float("-inf"))


def _spans(x: Tensor, start: int, count: int, block: int, span: int) -> Tensor:
    """The key spans of blocks start .. start + count as a strided view [R, G, S, X]."""
    part = x[:, start * block : start * block + span + (count - 1) * block]
    return part.unfold(1, span, block).transpose(-1, -2)


def _shares(lse: Tensor, has: Tensor | None, mem_logit: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The softmax mass of the span [R, T] and of each memory key [R, T, K] (float32 or
    float64), or (None, None) when the span takes all of it."""
    if mem_logit is None:
        return (None, None) if has is None else (has.to(lse.dtype), None)
    main = lse if has is None else torch.where(has, lse, float("-inf"))
    m = mem_logit.to(lse.dtype)
    top = torch.maximum(main, m.amax(dim=-1))
    w_main = torch.exp(main - top)
    w_mem = torch.exp(m - top[..., None])
    total = w_main + w_mem.sum(dim=-1)
    return w_main / total, w_mem / total[..., None]


class _SpanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mem_logit, mem_value, groups, band, block, look_back, look_ahead, valid, scale):
        r, t, _ = q.shape
        e = v.shape[-1]
        span, front = (look_back + 1 + look_ahead) * block, look_back * block
        blocks = t // block
        step = max(1, CHUNK_QUERIES // block)
        out = q.new_empty(r, t, e)
        lse = q.new_empty(r, t, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        has = None if groups is None else torch.empty(r, t, dtype=torch.bool, device=q.device)
        for start in range(0, blocks, step):
            count = min(step, blocks - start)
            rows = slice(start * block, (start + count) * block)
            bias = _chunk_bias(groups, band, start, count, block, span, front, valid)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, rows].view(r, count, block, -1),
                _spans(k, start, count, block, span),
                _spans(v, start, count, block, span),
                attn_mask=bias,
                scale=scale,
            )
            lse[:, rows] = l.reshape(r, -1)
            o = o.view(r, -1, e)
            if has is not None:
                has[:, rows] = (bias.amax(dim=-1) == 0).view(r, -1)
            ml = None if mem_logit is None else mem_logit[:, rows]
            share, mem_share = _shares(lse[:, rows], None if has is None else has[:, rows], ml)
            if share is None:
                out[:, rows] = o
            elif mem_share is None:
                out[:, rows] = o * share[..., None].to(o.dtype)
            else:
                # K is small (usually 1): products and sums, not a batched matmul of tiny matrices
                mem = (mem_share[..., None] * mem_value[:, rows].to(share.dtype)).sum(dim=-2)
                out[:, rows] = o.to(share.dtype) * share[..., None] + mem
        ctx.save_for_backward(q, k, v, mem_logit, mem_value, groups, band, out, lse, has)
        ctx.geometry = (block, look_back, look_ahead, valid, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mem_logit, mem_value, groups, band, out, lse, has = ctx.saved_tensors
        block, look_back, look_ahead, valid, scale = ctx.geometry
        r, t, _ = q.shape
        e = v.shape[-1]
        span, front = (look_back + 1 + look_ahead) * block, look_back * block
        blocks = t // block
        step = max(1, CHUNK_QUERIES // block)
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        with_mem = mem_logit is not None
        grad_logit = torch.empty_like(mem_logit) if with_mem else None
        grad_value = torch.empty_like(mem_value) if with_mem else None
        for start in range(0, blocks, step):
            count = min(step, blocks - start)
            rows = slice(start * block, (start + count) * block)
            bias = _chunk_bias(groups, band, start, count, block, span, front, valid)
            l = lse[:, rows]
            share, mem_share = _shares(
                l, None if has is None else has[:, rows], mem_logit[:, rows] if with_mem else None
            )
            dout = grad_out[:, rows]
            if mem_share is not None:
                # the memory keys' part of softmax(...) v: d logit = p (dO . mv - dO . out)
                work = share.dtype
                d, final = dout.to(work), out[:, rows].to(work)
                along = (d * final).sum(dim=-1, keepdim=True)
                toward = (d[:, :, None, :] * mem_value[:, rows].to(work)).sum(dim=-1)  # [R, T, K]
                grad_logit[:, rows] = (mem_share * (toward - along)).to(mem_logit.dtype)
                grad_value[:, rows] = (mem_share[..., None] * d[:, :, None, :]).to(mem_value.dtype)
            g = dout if share is None else (dout.to(share.dtype) * share[..., None]).to(q.dtype)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g.view(r, count, block, e),
                q[:, rows].view(r, count, block, -1),
                _spans(k, start, count, block, span),
                _spans(v, start, count, block, span),
                out[:, rows].view(r, count, block, e),
                l.view(r, count, block),
                0.0,
                False,
                attn_mask=bias,
                scale=scale,
            )
            grad_q[:, rows].view(gq.shape).copy_(gq)
            for j in range(span // block):
                at = slice(start * block + j * block, (start + count) * block + j * block)
                grad_k[:, at].view(r, count, block, -1).add_(gk[:, :, j * block : (j + 1) * block])
                grad_v[:, at].view(r, count, block, -1).add_(gv[:, :, j * block : (j + 1) * block])
        return grad_q, grad_k, grad_v, grad_logit, grad_value, *[None] * 7


def span_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    groups: Tensor | None,
    band: Tensor,
    *,
    block: int,
    look_back: int,
    scale: float,
    mem_logit: Tensor | None = None,
    mem_value: Tensor | None = None,
    look_ahead: int = 0,
    valid: int | None = None,
) -> Tensor:
    """Blocked span attention (module docstring); returns [R, T, E].

    q [R, T, D] (T a multiple of ``block``); k [R, F + T + A, D], v [R, F + T + A, E] with F =
    ``look_back * block`` front positions (masked) and A = ``look_ahead * block`` positions
    after the last block (S = F + Q + A); groups [R, F + T] int (the queries' groups are
    ``groups[:, F:]``; None: one group, every query must see a key through the band, e.g.
    itself; groups need ``look_ahead`` 0); ``valid``: without groups, the keys from F +
    ``valid`` on are padding too (masked); band [R or 1, Q, S] bool; mem_logit [R, T, K]
    (already scaled) and mem_value [R, T, K, E], or None. A query with no key and no memory
    gets zeros.
    """
    if groups is not None and look_ahead:
        raise ValueError("span_attention: groups take look_ahead=0")
    bias = additive_mask(band, q.dtype)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _SpanAttention.apply(
        q, k, v, mem_logit, mem_value, groups, bias, block, look_back, look_ahead, valid, scale
    )


class _Reorder(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is a gather too: every row of x is read
    once at a real position (``back`` gives it), extra positions get no gradient (their rows
    of the result are padding whose gradient is zero, or ``tail`` trailing rows per group
    of ``width`` that are zeroed)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, back: Tensor, width: int, tail: int) -> Tensor:
        ctx.save_for_backward(back)
        ctx.width, ctx.tail = width, tail
        return x.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (back,) = ctx.saved_tensors
        out = grad.contiguous().index_select(0, back)
        if ctx.tail:
            out.view(-1, ctx.width, *out.shape[1:])[:, -ctx.tail :] = 0
        return out, None, None, None, None


def causal_routed_attention_spans(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    clusters: Tensor,
    *,
    window_size: int,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mask: Tensor | None = None,
    shared_qk: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
) -> Tensor:
    """:func:`~longrange.ops.routing.causal.causal_routed_attention` without dropout, on
    :func:`span_attention`: q, k [B, H, N, D], v [B, H, N, E], clusters [B, H, N], mem_k
    [H, C, K, D], mem_v [H, C, K, E]; returns [B, H, N, E]. With ``shared_qk`` it needs at
    least one memory key (a query then never sees its own key)."""

    b, h, n, d = q.shape
    e = v.shape[-1]
    n_mem = 0 if mem_k is None else mem_k.shape[2]
    if shared_qk and not n_mem:
        raise ValueError("the span path needs a memory key with shared_qk")
    w = window_size
    block = min(block_size or default_block_size(w), max(n, 1))
    blocks = -(-n // block)
    look_back = min(-(-(w - 1) // block), blocks - 1)
    t, front = blocks * block, look_back * block
    span = (look_back + 1) * block
    scale = d**-0.5 if scale is None else scale
    device = q.device
    r = b * h

    order, sorted_clusters = sort_by_cluster(clusters, mask)  # [B, H, N]
    base = torch.arange(r, device=device).view(b, h, 1) * n
    src = (base + order).view(r, n)  # row of q / k / v at each sorted place
    inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=device).expand(b, h, n))
    inverse = inverse.view(r, n)
    rows = torch.arange(r, device=device)[:, None]
    q_index = F.pad(src, (0, t - n), value=0)
    kv_index = F.pad(src, (front, t - n), value=0)
    q_back = (rows * t + inverse).view(-1)
    kv_back = (rows * (front + t) + front + inverse).view(-1)
    qs = _Reorder.apply(q.reshape(r * n, d), q_index.view(-1), q_back, t, 0).view(r, t, d)
    ks = _Reorder.apply(k.reshape(r * n, d), kv_index.view(-1), kv_back, front + t, 0).view(r, front + t, d)
    vs = _Reorder.apply(v.reshape(r * n, e), kv_index.view(-1), kv_back, front + t, 0).view(r, front + t, e)
    groups = F.pad(sorted_clusters.view(r, n).int(), (front, t - n), value=NO_CLUSTER)

    cols = torch.arange(span, device=device)
    distance = front + torch.arange(block, device=device)[:, None] - cols
    band = (distance >= 0) & (distance < w)
    if shared_qk:
        band = band & (distance != 0)
    mem_logit = mem_value = None
    if n_mem:
        n_clusters = mem_k.shape[1]
        cluster = groups[:, front:].long().clamp(0, n_clusters - 1)  # [R, T]
        head = (torch.arange(r, device=device) % h)[:, None]
        slot = (((head * n_clusters + cluster) * n_mem)[..., None] + torch.arange(n_mem, device=device)).view(
            -1
        )
        mem_key = mem_k.to(q.dtype).reshape(-1, d).index_select(0, slot).view(r, t, n_mem, d)
        mem_logit = torch.linalg.vecdot(qs[:, :, None, :], mem_key) * scale  # [R, T, K]
        mem_value = mem_v.to(v.dtype).reshape(-1, e).index_select(0, slot).view(r, t, n_mem, e)
    out = span_attention(
        qs, ks, vs, groups, band[None], block=block, look_back=look_back, scale=scale,
        mem_logit=mem_logit, mem_value=mem_value,
    )  # fmt: skip
    back = q_index.view(-1)  # sorted place -> row of the result in time order
    out = _Reorder.apply(out.view(r * t, e), (rows * t + inverse).view(-1), back, t, t - n)
    out = out.view(b, h, n, e)
    if mask is not None:
        out = out.masked_fill(~mask[:, None, :, None], 0.0)
    return out


def local_attention_spans(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int,
    causal: bool,
    look_backward: int = 1,
    look_forward: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Local attention (:func:`longrange.ops.local.local_attention`, causal or not, not
    ``exact_windowsize``, no mask, no rotary inside the op: rotate q and k at their absolute
    positions first) on :func:`span_attention`: q, k, v [B, H, N, D] -> [B, H, N, D]. A causal
    one looks forward no window."""
    for name, value, least in (("window_size", window_size, 1), ("look_backward", look_backward, 0),
                               ("look_forward", look_forward, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if causal and look_forward:
        raise ValueError("causal local attention looks forward no window (look_forward=0)")
    if not all(isinstance(t, Tensor) and t.is_floating_point() and t.dtype == q.dtype for t in (q, k, v)):
        raise TypeError("q, k and v must be floating-point tensors of one dtype")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q, k [B, H, N, D] and v [B, H, N, E] do not fit: {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, h, n, d = q.shape
    if q.numel() == 0:  # no batch, head or position: v is the empty output
        return v.clone()
    c = window_size
    blocks = -(-n // c)
    t, front, ahead = blocks * c, look_backward * c, look_forward * c
    r = b * h
    qs = F.pad(q, (0, 0, 0, t - n)).reshape(r, t, d)
    ks = F.pad(k, (0, 0, front, t - n + ahead)).reshape(r, front + t + ahead, d)
    vs = F.pad(v, (0, 0, front, t - n + ahead)).reshape(r, front + t + ahead, v.shape[-1])
    cols = torch.arange((look_backward + 1 + look_forward) * c, device=q.device)
    if causal:
        band = front + torch.arange(c, device=q.device)[:, None] - cols >= 0
    else:
        band = torch.ones(c, cols.shape[0], dtype=torch.bool, device=q.device)
    scale = d**-0.5 if scale is None else scale
    out = span_attention(
        qs, ks, vs, None, band[None], block=c, look_back=look_backward, scale=scale,
        look_ahead=look_forward, valid=None if causal else n,
    )  # fmt: skip
    return out.view(b, h, t, -1)[:, :, :n]
