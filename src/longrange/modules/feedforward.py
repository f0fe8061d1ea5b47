"""Position-wise feed-forward layers and sequence chunking.

- :class:`FeedForward` is the two-layer MLP every family uses: ``w2(dropout(act(w1(x))))``. With
  ``glu=True`` the first projection is twice as wide and its halves are combined as
  ``act(a) * b`` (a gated linear unit; GEGLU when the activation is GELU, Shazeer 2020).
- :class:`GEGLUFeedForward` is the GLU variant whose inner width is 2/3 of ``dim * mult``, so
  that it has about as many parameters as the plain MLP of the same ``mult``.
- :class:`Chunk` runs any position-wise layer over slices of the sequence, trading a little
  speed for a peak activation memory divided by ``chunks``.

The parameter names (``w1``, ``w2``) follow the references' feed-forward so that weight
conversion is a rename-free copy. Where a reference gates the other way round
(``a * act(b)``), converting means swapping the two halves of ``w1``'s rows.

Dimensions: B batch, N sequence, D model width, F inner width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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
