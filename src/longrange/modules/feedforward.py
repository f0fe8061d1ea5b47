"""Position-wise feed-forward layers and sequence chunking.

- :class:`FeedForward` is the two-layer MLP every family uses: ``w2(dropout(act(w1(x))))``. With
  ``glu=True`` the first projection is twice as wide and its halves are combined as
  ``act(a) * b`` (a gated linear unit; GEGLU when the activation is GELU, Shazeer 2020).
- :class:`GEGLUFeedForward` is the GLU variant whose inner width is 2/3 of ``dim * mult``, so
  that it has about as many parameters as the plain MLP of the same ``mult``.
- :class:`Chunk` runs any position-wise layer over slices of the sequence, trading a little
  speed for a peak activation memory divided by ``chunks``.
- :func:`lean_feed_forward` is a GELU :class:`FeedForward` (optionally behind its pre-norm
  ``nn.LayerNorm``) in one autograd function that keeps less for backward than the plain
  layers: the input, the pre-activation and the hidden activations (``keep="hidden"``;
  backward forms the normalised input again, an elementwise pass), the input and the
  pre-activation (``keep="pre"``: backward forms the activation again, a GEGLU's product
  included), or the input only (``keep="input"``, ``recompute=True``: backward forms the
  hidden activations again, a slice at a time, so that they never exist for the whole
  sequence). It works on slices of at most
  ``SLICE_ROWS`` positions (at least ``chunks`` slices), so that a slice's activations are
  still in cache when the next step reads them, at any length. Outputs and gradients are the
  plain layers'.

The parameter names (``w1``, ``w2``) follow the references' feed-forward so that weight
conversion is a rename-free copy. Where a reference gates the other way round
(``a * act(b)``), converting means swapping the two halves of ``w1``'s rows.

Dimensions: B batch, N sequence, D model width, F inner width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_activation(activation: type[nn.Module] | nn.Module | None) -> nn.Module:
    """An activation module from None (GELU), an nn.Module subclass, or an instance."""
    if activation is None:
        return nn.GELU()
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    raise TypeError(
        "activation must be None (GELU), an nn.Module subclass such as nn.ReLU, or an "
        f"nn.Module instance; got {activation!r}"
    )


class FeedForward(nn.Module):
    """Two-layer MLP, optionally gated: x [B, N, D] -> [B, N, D] (any leading dims).

    Args:
        dim: model width D.
        mult: inner width F = ``dim * mult`` unless ``inner_dim`` is given.
        dropout: dropout on the inner activations.
        activation: an ``nn.Module`` class (instantiated with no arguments) or instance;
            GELU when None.
        glu: gate the inner activations: ``act(a) * b`` with ``[a, b] = w1(x)``.
        inner_dim: explicit inner width F (overrides ``mult``).
        bias: whether the two projections have biases.
        dim_out: output width (``dim`` when None).

    Extra keyword arguments to ``forward`` are accepted and ignored so that the layer can sit
    in a block whose other branch takes a mask or a context.
    """

    def __init__(
        self,
        dim: int,
        mult: int | float = 4,
        dropout: float = 0.0,
        activation: type[nn.Module] | nn.Module | None = None,
        glu: bool = False,
        *,
        inner_dim: int | None = None,
        bias: bool = True,
        dim_out: int | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if inner_dim is None:
            if mult <= 0:
                raise ValueError(f"mult must be positive, got {mult}")
            inner_dim = int(dim * mult)
        if inner_dim <= 0:
            raise ValueError(f"inner_dim must be positive, got {inner_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.glu = glu
        self.inner_dim = inner_dim
        self.w1 = nn.Linear(dim, inner_dim * (2 if glu else 1), bias=bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(inner_dim, dim if dim_out is None else dim_out, bias=bias)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        h = self.w1(x)
        if self.glu:
            a, b = h.chunk(2, dim=-1)
            h = self.act(a) * b
        else:
            h = self.act(h)
        return self.w2(self.dropout(h))


class GEGLUFeedForward(FeedForward):
    """GELU-gated feed-forward with inner width ``int(dim * mult * 2 / 3)``.

    The gated layer has three D x F matrices instead of two, so the 2/3 keeps its parameter
    count close to the plain MLP's at the same ``mult`` (the block-recurrent reference's
    choice, where ``bias=False``).
    """

    def __init__(
        self,
        dim: int,
        mult: int | float = 4,
        dropout: float = 0.0,
        *,
        bias: bool = False,
        dim_out: int | None = None,
    ) -> None:
        if mult <= 0:
            raise ValueError(f"mult must be positive, got {mult}")
        super().__init__(
            dim,
            mult,
            dropout,
            nn.GELU,
            True,
            inner_dim=max(1, int(dim * mult * 2 / 3)),
            bias=bias,
            dim_out=dim_out,
        )


class Chunk(nn.Module):
    """Apply ``fn`` to ``chunks`` slices of the input along ``along_dim`` and concatenate.

    ``fn`` must act on positions independently (a feed-forward layer, a norm); then the result
    equals ``fn(x)`` while only one slice's intermediate activations exist at a time.
    ``chunks <= 1`` calls ``fn`` once. Keyword arguments are passed to every call.
    """

    def __init__(self, chunks: int, fn: Callable[..., Tensor], along_dim: int = -2) -> None:
        super().__init__()
        if not isinstance(chunks, int) or isinstance(chunks, bool):
            raise TypeError(f"chunks must be an int, got {type(chunks).__name__}")
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks
        self.fn = fn
        self.along_dim = along_dim

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        if self.chunks <= 1 or x.shape[self.along_dim] <= 1:
            return self.fn(x, **kwargs)
        pieces = x.chunk(self.chunks, dim=self.along_dim)
        return torch.cat([self.fn(p, **kwargs) for p in pieces], dim=self.along_dim)


def lean_applies(ff: FeedForward, norm: nn.Module | None = None) -> bool:
    """Whether :func:`lean_feed_forward` computes ``ff`` (after ``norm``) exactly: a GELU
    layer without active dropout, a LayerNorm (or no norm) in front, gradients wanted, and no
    autocast with a norm (the norm's backward would meet reduced-precision activations with
    full-precision weights)."""
    return (
        torch.is_grad_enabled()
        and (norm is None or not torch.is_autocast_enabled(ff.w1.weight.device.type))
        and type(ff.act) is nn.GELU
        and (ff.dropout.p == 0 or not ff.training)
        and (norm is None or type(norm) is nn.LayerNorm)
    )


def lean_feed_forward(
    ff: FeedForward,
    x: Tensor,
    *,
    norm: nn.LayerNorm | None = None,
    chunks: int = 1,
    recompute: bool = False,
    keep: str | None = None,
) -> Tensor:
    """``ff(norm(x))`` for x [B, N, D] (see the module docstring and :func:`lean_applies`);
    ``chunks`` slices along N when forming the hidden activations. ``keep`` (one of
    :data:`KEEPS`) says what backward keeps of each slice: "hidden" (the pre-activation and
    the hidden activations; the default), "pre" (the pre-activation only: backward forms the
    activation again, one elementwise pass) or "input" (nothing: ``recompute=True``)."""
    if recompute and keep not in (None, "input"):
        raise ValueError(f"recompute=True keeps the input only, got keep={keep!r}")
    keep = keep or ("input" if recompute else "hidden")
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    ln = (None, None, None) if norm is None else (norm.weight, norm.bias, norm.eps)
    return _LeanFeedForward.apply(
        x,
        *ln,
        ff.w1.weight,
        ff.w1.bias,
        ff.w2.weight,
        ff.w2.bias,
        ff.glu,
        ff.act.approximate,
        chunks,
        keep,
    )


def _act(pre: Tensor, glu: bool, approximate: str) -> Tensor:
    if not glu:
        return F.gelu(pre, approximate=approximate)
    a, g = pre.chunk(2, dim=-1)
    return F.gelu(a, approximate=approximate) * g


def _act_backward(d_hidden: Tensor, pre: Tensor, glu: bool, approximate: str) -> Tensor:
    if not glu:
        return torch.ops.aten.gelu_backward(d_hidden, pre, approximate=approximate)
    a, g = pre.chunk(2, dim=-1)
    d_a = torch.ops.aten.gelu_backward(d_hidden * g, a, approximate=approximate)
    return torch.cat((d_a, d_hidden * F.gelu(a, approximate=approximate)), dim=-1)


# Rows (positions) per slice of the lean layer, so that its working set stays in cache at any
# length. On CPU, 1024 rows: a slice's inner activations are a few MB, so that the elementwise passes
# over them read cache. Training steps in turn against 4096 rows (this project's 2-core CPU):
# block_recurrent at its reference defaults, 8K, 1.05-1.10x; PerformerLM at 16K 1.05x;
# vanilla at 4K 1.04x. 512 rows was 2-3% slower again on block_recurrent and vanilla. On a
# GPU, slices only add kernel launches: 4096 rows there (not measured on one yet).
SLICE_ROWS = 1024
SLICE_ROWS_GPU = 4096


# what the lean layer keeps of each slice for backward (the rest is formed again there)
KEEPS = ("hidden", "pre", "input")


def _add_product(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total += a @ b, also when autocast made a and b narrower than total."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += (a @ b).to(total.dtype)


class _LeanFeedForward(torch.autograd.Function):
    """(LayerNorm ->) w1 -> GELU (or GEGLU) -> w2 over the rows of x [..., D], in slices of at
    most :data:`SLICE_ROWS` rows (:data:`SLICE_ROWS_GPU` off the CPU; at least ``chunks``
    slices); what backward keeps (``keep``, one of :data:`KEEPS`) is kept per slice (no copy
    into whole-length tensors). Without a norm it also runs under autocast: backward then
    works in the forward's compute dtype and sums the weight gradients in the weights' own."""

    @staticmethod
    def _normed(x, ln_w, ln_b, eps: float | None, with_stats: bool = False):
        """x, LayerNorm(x) when ``eps`` is given (with its mean and 1 / std if asked)."""
        if eps is None:
            return (x, None, None) if with_stats else x
        out = torch.native_layer_norm(x, x.shape[-1:], ln_w, ln_b, eps)
        return out if with_stats else out[0]

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2, glu, approximate, chunks, keep):
        rows = x.reshape(-1, x.shape[-1])
        limit = SLICE_ROWS if x.device.type == "cpu" else SLICE_ROWS_GPU
        size = max(1, min(limit, -(-rows.shape[0] // max(chunks, 1))))
        outs, kept = [], []
        for xs in rows.split(size):
            pre = F.linear(_LeanFeedForward._normed(xs, ln_w, ln_b, eps), w1, b1)
            hidden = _act(pre, glu, approximate)
            outs.append(F.linear(hidden, w2, b2))
            kept += {"hidden": [pre, hidden], "pre": [pre], "input": []}[keep]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2, b2, *kept)
        ctx.eps, ctx.glu, ctx.approximate, ctx.size, ctx.keep = eps, glu, approximate, size, keep
        ctx.dtype = pre.dtype  # the compute dtype: lower than the weights' under autocast
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, ln_w, ln_b, w1, b1, w2, b2, *kept = ctx.saved_tensors
        grads = {name: None if t is None else torch.zeros_like(t) for name, t in (
            ("ln_w", ln_w), ("ln_b", ln_b), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)
        )}  # fmt: skip
        dt = ctx.dtype
        if dt != w1.dtype:
            w1, b1, w2, b2 = (None if t is None else t.to(dt) for t in (w1, b1, w2, b2))
        xs_all = x.reshape(-1, x.shape[-1]).split(ctx.size)
        ds_all = d_out.to(dt).reshape(-1, d_out.shape[-1]).split(ctx.size)
        dxs = []
        for i, (xs, ds) in enumerate(zip(xs_all, ds_all)):
            normed, mean, rstd = _LeanFeedForward._normed(xs, ln_w, ln_b, ctx.eps, with_stats=True)
            normed = normed.to(dt)
            if ctx.keep == "hidden":
                pre, hidden = kept[2 * i], kept[2 * i + 1]
            else:
                pre = kept[i] if ctx.keep == "pre" else F.linear(normed, w1, b1)
                hidden = _act(pre, ctx.glu, ctx.approximate)
            _add_product(grads["w2"], ds.T, hidden)
            del hidden
            if b2 is not None:
                grads["b2"] += ds.sum(0)
            d_pre = _act_backward(ds @ w2, pre, ctx.glu, ctx.approximate)
            _add_product(grads["w1"], d_pre.T, normed)
            if b1 is not None:
                grads["b1"] += d_pre.sum(0)
            d_normed = d_pre @ w1
            if mean is None:
                dxs.append(d_normed)
                continue
            mask = (True, ln_w is not None, ln_b is not None)
            dx, d_lnw, d_lnb = torch.ops.aten.native_layer_norm_backward(
                d_normed, xs, xs.shape[-1:], mean, rstd, ln_w, ln_b, mask
            )
            dxs.append(dx)
            if ln_w is not None:
                grads["ln_w"] += d_lnw
            if ln_b is not None:
                grads["ln_b"] += d_lnb
        dx = (torch.cat(dxs) if len(dxs) > 1 else dxs[0]).view(x.shape).to(x.dtype)
        g = grads
        return dx, g["ln_w"], g["ln_b"], None, g["w1"], g["b1"], g["w2"], g["b2"], None, None, None, None
