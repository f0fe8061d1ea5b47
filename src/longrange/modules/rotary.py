"""Rotary position embeddings (RoFormer), in both conventions the references use.

- ``interleaved=False`` (rotate-half): the first and second halves of the rotated width form the
  pairs; with ``xpos_scale_base`` set, queries are scaled by zeta**(t/base) and keys by its
  inverse (xPos, Sun et al. 2022), so that attention decays with distance.
- ``interleaved=True``: neighbouring features (0, 1), (2, 3), ... form the pairs.

Only the first ``dim`` features of the head are rotated; the rest pass through.
Dimensions: N positions, R rotated width (``dim``), D head width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(
    x: Tensor, angles: Tensor, *, interleaved: bool = False, scale: Tensor | float = 1.0
) -> Tensor:
    """Rotate the first R features of ``x`` [..., N, D] by ``angles`` [N, R] (already expanded
    to one angle per feature); ``scale`` ([N, R] or a number) multiplies the rotated part."""
    return _rotated(x, angles.cos(), angles.sin(), interleaved, scale)


def _rotated(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, scale: Tensor | float) -> Tensor:
    """:func:`apply_rotary` given the angles' cosines and sines [N, R]."""
    rot = cos.shape[-1]
    x_rot, x_pass = (x, None) if x.shape[-1] == rot else (x[..., :rot], x[..., rot:])
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    turn = rotate_interleaved(x_rot) if interleaved else rotate_half(x_rot)
    x_rot = x_rot * cos + turn * sin
    if isinstance(scale, Tensor):
        x_rot = x_rot * scale.to(x.dtype)
    elif scale != 1.0:
        x_rot = x_rot * scale
    return x_rot if x_pass is None else torch.cat((x_rot, x_pass), dim=-1)


class RotaryEmbedding(nn.Module):
    """Angles (and xPos scales) for positions; apply with :meth:`rotate_queries_and_keys`.

    ``dim`` is the rotated width (even); ``theta`` the base of the frequencies.
    """

    def __init__(
        self,
        dim: int,
        *,
        theta: float = 10000.0,
        interleaved: bool = False,
        xpos_scale_base: float | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        self.dim = dim
        self.interleaved = interleaved
        self.xpos_scale_base = xpos_scale_base
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        xpos = (torch.arange(0, dim, 2, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("xpos_zeta", xpos, persistent=False)

    def _expand(self, per_pair: Tensor) -> Tensor:
        if self.interleaved:
            return per_pair.repeat_interleave(2, dim=-1)
        return torch.cat((per_pair, per_pair), dim=-1)

    def angles(self, positions: Tensor) -> Tensor:
        """positions [N] (any real numbers) -> angles [N, R]."""
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        return self._expand(freqs)

    def xpos_scale(self, positions: Tensor) -> Tensor:
        """positions [N] -> query scale [N, R]; keys use its reciprocal."""
        if self.xpos_scale_base is None:
            raise ValueError("xpos_scale needs xpos_scale_base")
        power = positions.to(self.xpos_zeta.dtype)[:, None] / self.xpos_scale_base
        return self._expand(self.xpos_zeta[None, :] ** power)

    def rotate(self, x: Tensor, positions: Tensor, *, scale: Tensor | float = 1.0) -> Tensor:
        """Rotate x [..., N, D] at ``positions`` [N]."""
        return apply_rotary(x, self.angles(positions), interleaved=self.interleaved, scale=scale)

    def rotate_queries_and_keys(
        self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Rotate q [..., N, D] and k [..., M, D]; with xPos, q is scaled up and k down.

        Only position differences matter to q·k (and, with xPos, the scale depends on the
        difference too), so positions may be offset by any constant, e.g. for KV caches.
        """
        if self.xpos_scale_base is None:
            if q_positions is k_positions:  # one set of angles for both (decoding: half the rotary ops)
                angles = self.angles(q_positions)
                cos, sin = angles.cos(), angles.sin()
                return tuple(_rotated(x, cos, sin, self.interleaved, 1.0) for x in (q, k))
            return self.rotate(q, q_positions), self.rotate(k, k_positions)
        q_scale = self.xpos_scale(q_positions)
        k_scale = self.xpos_scale(k_positions).reciprocal()
        return self.rotate(q, q_positions, scale=q_scale), self.rotate(k, k_positions, scale=k_scale)
