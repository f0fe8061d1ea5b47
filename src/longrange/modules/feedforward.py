"""Position-wise feed-forward layers and sequence chunking.

- :class:`FeedForward` is the two-layer MLP every family uses: ``w2(dropout(act(w1(x))))``. With
  ``glu=True`` the first projection is twice as wide and its halves are combined as
  ``act(a) * b`` (a gated linear unit; GEGLU when the activation is GELU, Shazeer 2020).
- :class:`GEGLUFeedForward` is the GLU variant whose inner width is 2/3 of ``dim * mult``, so
  that it has about as many parameters as the plain MLP of the same ``mult``.
- :class:`Chunk` runs any position-wise layer over slices of the sequence, trading a little
  speed for a peak activation memory divided by ``chunks``.
- :func:`lean_feed_forward` is a GELU :class:`FeedForward` (optionally behind its pre-norm
  ``nn.LayerNorm``) on the sliced MLP op (:func:`~longrange.ops.mlp.chunked.sliced_mlp`), one
  autograd function that keeps less for backward than the plain layers: the input, the
  pre-activation and the hidden activations (``keep="hidden"``; backward forms the
  normalised input again, an elementwise pass), the input and the pre-activation
  (``keep="pre"``: backward forms the activation again, a GEGLU's product included), or the
  input only (``keep="input"``, ``recompute=True``: backward forms the hidden activations
  again, a slice at a time, so that they never exist for the whole sequence). It works on
  slices of at most ``SLICE_ROWS`` positions (at least ``chunks`` slices), so that a slice's
  activations are still in cache when the next step reads them, at any length. Outputs and
  gradients are the plain layers'.

The parameter names (``w1``, ``w2``) follow the references' feed-forward so that weight
conversion is a rename-free copy. Where a reference gates the other way round
(``a * act(b)``), converting means swapping the two halves of ``w1``'s rows.

Dimensions: B batch, N sequence, D model width, F inner width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from longrange.ops.mlp.chunked import CHUNKED_ACTIVATIONS, sliced_mlp


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


def activation_name(act: nn.Module) -> str | None:
    """The :data:`~longrange.ops.mlp.CHUNKED_ACTIVATIONS` name of an activation module."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    names = {nn.ReLU: "relu", nn.SiLU: "silu"}
    name = names.get(type(act))
    return name if name in CHUNKED_ACTIVATIONS else None


# Rows (positions) per slice of the lean layer, so that its working set stays in cache at any
# length. On CPU, 1024 rows: a slice's inner activations are a few MB, so that the elementwise
# passes over them read cache. Training steps in turn against 4096 rows (this project's
# 2-core CPU): block_recurrent at its reference defaults, 8K, 1.05-1.10x; PerformerLM at 16K
# 1.05x; vanilla at 4K 1.04x. 512 rows was 2-3% slower again on block_recurrent and vanilla.
# On a GPU, slices only add kernel launches: 4096 rows there (not measured on one yet).
SLICE_ROWS = 1024
SLICE_ROWS_GPU = 4096


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
    """``ff(norm(x))`` for x [B, N, D] (see the module docstring and :func:`lean_applies`) on
    :func:`~longrange.ops.mlp.chunked.sliced_mlp`; ``chunks`` slices along N at least.
    ``keep`` says what backward keeps of each slice: "hidden" (the pre-activation and the
    hidden activations; the default), "pre" (the pre-activation only: backward forms the
    activation again, one elementwise pass) or "input" (nothing: ``recompute=True``)."""
    if recompute and keep not in (None, "input"):
        raise ValueError(f"recompute=True keeps the input only, got keep={keep!r}")
    keep = keep or ("input" if recompute else "hidden")
    positions = x.numel() // max(x.shape[-1], 1)
    limit = SLICE_ROWS if x.device.type == "cpu" else SLICE_ROWS_GPU
    return sliced_mlp(
        x,
        ff.w1.weight,
        ff.w1.bias,
        ff.w2.weight,
        ff.w2.bias,
        activation=activation_name(ff.act),
        rows=max(1, min(limit, -(-positions // max(chunks, 1)))),
        keep=keep,
        glu=ff.glu,
        norm=None if norm is None else (norm.weight, norm.bias, norm.eps),
    )
