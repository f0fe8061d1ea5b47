"""Normalisation layers and the pre-norm / ReZero wrappers around a block's branches.

- :class:`LayerNorm`: ``nn.LayerNorm`` with a keyword-only ``bias`` switch (the block-recurrent
  reference keeps the shift fixed at zero).
- :class:`ScaleNorm` (Nguyen & Salazar 2019): ``g * x / ||x||`` with one learned scalar ``g``.
- :class:`RMSNorm` (Zhang & Sennrich 2019): ``weight * x / rms(x)`` with a learned scale per
  feature.
- :class:`ReZero` (Bachlechner et al. 2020): scales a branch's output by a learned scalar that
  starts at 0 (routing, sinkhorn) or at a small value such as 1e-3 (performer).
- :class:`PreNorm`, :class:`PreScaleNorm`, :class:`PreLayerNorm`: normalise, then call the
  wrapped branch with every keyword argument passed through.

A branch may return ``(out, aux_loss)`` (see ``longrange.modules.reversible``); the wrappers
leave the auxiliary loss untouched. ScaleNorm and RMSNorm compute their statistics in float32
for half-precision inputs and return the input dtype.

Dimensions: D model width; inputs are [..., D].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """Layer normalisation over the last dimension, with or without the learned shift."""

    def __init__(self, dim: int, *, bias: bool = True, eps: float = 1e-5) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        super().__init__(dim, eps=eps, bias=bias)


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ScaleNorm(nn.Module):
    """x [..., D] -> g * x / max(||x||, eps), one learned scalar ``g`` (initialised to 1)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        xf = _upcast(x)
        norm = xf.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        return (xf / norm * self.g).to(x.dtype)


class RMSNorm(nn.Module):
    """x [..., D] -> weight * x / sqrt(mean(x^2) + eps), ``weight`` [D] initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _upcast(x)
        scale = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * scale * self.weight).to(x.dtype)


def _scale_first(out, factor: Tensor):
    if isinstance(out, tuple):
        return (out[0] * factor, *out[1:])
    return out * factor


class ReZero(nn.Module):
    """``fn(x, **kwargs) * g`` with a learned scalar ``g`` starting at ``init``.

    ``init=0.`` makes every residual branch start as the identity map (the ReZero paper and
    the routing/sinkhorn references); ``init=1e-3`` is the performer reference's choice. Only
    the first element of a ``(out, aux_loss)`` result is scaled.
    """

    def __init__(self, fn: Callable, *, init: float = 0.0) -> None:
        super().__init__()
        if not isinstance(init, (int, float)) or isinstance(init, bool):
            raise TypeError(f"init must be a number such as 0. or 1e-3, got {init!r}")
        self.fn = fn
        self.g = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, x: Tensor, **kwargs):
        return _scale_first(self.fn(x, **kwargs), self.g)


NORMS: dict[str, Callable[[int], nn.Module]] = {
    "layer": LayerNorm,
    "layer_no_bias": lambda dim: LayerNorm(dim, bias=False),
    "scale": ScaleNorm,
    "rms": RMSNorm,
}


def make_norm(norm: str | Callable[[int], nn.Module], dim: int) -> nn.Module:
    """Build a norm from a name in :data:`NORMS` or from a callable ``norm(dim)``."""
    if isinstance(norm, str):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)} or a callable, got {norm!r}")
        return NORMS[norm](dim)
    if not callable(norm):
        raise TypeError(f"norm must be a name in {sorted(NORMS)} or a callable, got {norm!r}")
    module = norm(dim)
    if not isinstance(module, nn.Module):
        raise TypeError(f"norm(dim) must return an nn.Module, got {type(module).__name__}")
    return module


class PreNorm(nn.Module):
    """``fn(norm(x), **kwargs)``: x [..., D]; the result is whatever ``fn`` returns.

    ``norm`` is a name (``"layer"``, ``"layer_no_bias"``, ``"scale"``, ``"rms"``) or a callable
    taking ``dim`` and returning a module (``nn.LayerNorm``, :class:`ScaleNorm`, ...).
    """

    def __init__(self, dim: int, fn: Callable, *, norm: str | Callable[[int], nn.Module] = "layer") -> None:
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class PreScaleNorm(PreNorm):
    """:class:`PreNorm` with a :class:`ScaleNorm` of the given ``eps``."""

    def __init__(self, dim: int, fn: Callable, eps: float = 1e-5) -> None:
        super().__init__(dim, fn, norm=lambda d: ScaleNorm(d, eps=eps))


class PreLayerNorm(PreNorm):
    """:class:`PreNorm` with a :class:`LayerNorm` (with or without its bias)."""

    def __init__(self, dim: int, fn: Callable, *, bias: bool = True) -> None:
        super().__init__(dim, fn, norm=lambda d: LayerNorm(d, bias=bias))
