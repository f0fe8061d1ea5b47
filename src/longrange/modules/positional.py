"""Absolute position embeddings and the T5 relative position bias.

- :class:`FixedPositionalEmbedding`: sinusoids (Vaswani et al. 2017), laid out as
  ``[sin(p * f_0..f_{D/2-1}), cos(p * f_0..f_{D/2-1})]`` like the routing and performer
  references (halves, not interleaved).
- :class:`AbsolutePositionalEmbedding`: a learned table of ``max_seq_len`` rows.
- :class:`AxialPositionalEmbedding`: the position ``p`` is factored into coordinates over
  ``axial_shape`` (row-major, the last axis fastest); each axis has its own small table and the
  per-axis vectors are summed (every axis is D wide) or concatenated (widths ``axial_dims``
  summing to D), as in the axial-positional-embedding package. Parameters are stored with that
  package's shapes, ``weights[i]: [1, 1, .., S_i, .., 1, D_i]``.
- :class:`T5RelativePositionBias` (Raffel et al. 2020): one learned scalar per head and bucket
  of the distance ``key_position - query_position``; exact buckets for small distances,
  logarithmic ones up to ``max_distance``. Causal bucketing folds every future distance into
  bucket 0; bidirectional bucketing gives future distances their own half of the buckets.

Rotary embeddings live in ``longrange.modules.rotary``.

The absolute embeddings take ``x`` [B, N, ...] (only N is read) and return [1, N, D] to be
added; ``offset`` shifts the positions, for continuing a sequence during decoding.
Dimensions: B batch, N queries, M keys, D width, H heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from longrange.checks import is_positive_int


def _check_positions(n: int, offset: int, max_seq_len: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + n > max_seq_len:
        raise ValueError(
            f"positions up to {offset + n} exceed max_seq_len={max_seq_len} "
            f"(sequence length {n}, offset {offset})"
        )


class FixedPositionalEmbedding(nn.Module):
    """Sinusoidal table of ``max_seq_len`` rows; ``dim`` must be even. Not a parameter."""

    def __init__(self, dim: int, max_seq_len: int, *, theta: float = 10000.0) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        table = torch.cat((angles.sin(), angles.cos()), dim=-1).float()
        self.register_buffer("emb", table, persistent=False)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """x [B, N, ...] -> [1, N, D] in x's dtype (floating x) or float32."""
        n = x.shape[1]
        _check_positions(n, offset, self.max_seq_len)
        out = self.emb[offset : offset + n][None]
        return out.to(x.dtype) if x.is_floating_point() else out


class AbsolutePositionalEmbedding(nn.Module):
    """Learned table ``emb`` of shape [max_seq_len, D]."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """x [B, N, ...] -> [1, N, D]."""
        n = x.shape[1]
        _check_positions(n, offset, self.max_seq_len)
        return self.emb.weight[offset : offset + n][None]


class AxialPositionalEmbedding(nn.Module):
    """Factored learned positions over ``axial_shape`` (prod = max_seq_len).

    With ``axial_dims=None`` the per-axis vectors (each D wide) are summed; otherwise axis i has
    width ``axial_dims[i]`` and the vectors are concatenated (the widths must sum to D).
    """

    def __init__(self, dim: int, axial_shape: Sequence[int], axial_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        axial_shape = tuple(axial_shape)
        if not axial_shape or not all(is_positive_int(s) for s in axial_shape):
            raise ValueError(f"axial_shape must be non-empty positive int sizes, got {axial_shape}")
        self.summed = axial_dims is None
        dims = (dim,) * len(axial_shape) if axial_dims is None else tuple(axial_dims)
        if not all(is_positive_int(w) for w in dims):
            raise ValueError(
                f"dim and axial_dims must be positive ints, got dim={dim!r}, axial_dims={axial_dims!r}"
            )
        if len(dims) != len(axial_shape):
            raise ValueError(
                f"axial_dims must have one width per axis of axial_shape {axial_shape}, got {dims}"
            )
        if not self.summed and sum(dims) != dim:
            raise ValueError(f"axial_dims must sum to dim={dim}, got {dims} (sum {sum(dims)})")
        self.dim = dim
        self.axial_shape = axial_shape
        self.max_seq_len = math.prod(axial_shape)
        self.weights = nn.ParameterList()
        for axis, (size, width) in enumerate(zip(axial_shape, dims)):
            shape = [1] * (len(axial_shape) + 2)
            shape[axis + 1] = size
            shape[-1] = width
            self.weights.append(nn.Parameter(torch.randn(shape)))

    def table(self) -> Tensor:
        """All positions at once: [max_seq_len, D]."""
        full = [w.expand(1, *self.axial_shape, w.shape[-1]) for w in self.weights]
        out = torch.stack(full).sum(dim=0) if self.summed else torch.cat(full, dim=-1)
        return out.reshape(self.max_seq_len, self.dim)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """x [B, N, ...] -> [1, N, D]."""
        n = x.shape[1]
        _check_positions(n, offset, self.max_seq_len)
        out = self.table()[offset : offset + n][None]
        return out.to(x.dtype) if x.is_floating_point() else out


def t5_relative_position_bucket(
    relative_position: Tensor, *, causal: bool, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bucket ids in [0, num_buckets) for ``relative_position = key_pos - query_pos`` (long).

    Bidirectional: keys at or before the query use buckets [0, num_buckets/2), keys after it
    the upper half. Causal: keys after the query all fall into bucket 0 (they are masked
    anyway). Within a half of E buckets, distances below E/2 have a bucket each; larger ones
    share E/2 logarithmically spaced buckets up to ``max_distance``, beyond which they saturate.
    """
    distance = -relative_position
    offset = torch.zeros_like(distance)
    if causal:
        distance = distance.clamp_min(0)
    else:
        num_buckets //= 2
        offset = (distance < 0).long() * num_buckets
        distance = distance.abs()
    max_exact = num_buckets // 2
    # float32 like T5 and the references, so that bucket boundaries land where theirs do
    ratio = distance.clamp_min(1).float() / max_exact
    log_bucket = torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = (max_exact + log_bucket.long()).clamp_max(num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, large)


class T5RelativePositionBias(nn.Module):
    """Per-head additive attention bias from bucketed relative positions: [H, N, M].

    ``forward(n, m)`` places query i at position ``offset + i`` and key j at ``j``; by default
    ``offset = m - n``, i.e. the queries are the last n of the m keys (keys longer than queries,
    as with XL memories or a KV cache). ``scale`` multiplies the bias (the memorizing reference
    uses ``dim_head ** 0.5`` because it scales queries before the bias is added).
    """

    def __init__(
        self,
        *,
        heads: int = 8,
        num_buckets: int = 32,
        max_distance: int = 128,
        causal: bool = False,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if heads <= 0:
            raise ValueError(f"heads must be positive, got {heads}")
        min_buckets = 2 if causal else 4
        if num_buckets < min_buckets:
            raise ValueError(f"num_buckets must be >= {min_buckets} for causal={causal}, got {num_buckets}")
        half = num_buckets if causal else num_buckets // 2
        if max_distance <= half // 2:
            raise ValueError(f"max_distance must exceed the exact range {half // 2}, got {max_distance}")
        self.heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.causal = causal
        self.scale = scale
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def buckets(self, n: int, m: int | None = None, *, offset: int | None = None, device=None) -> Tensor:
        """Bucket ids [N, M] for n queries against m keys."""
        m = n if m is None else m
        offset = m - n if offset is None else offset
        q_pos = torch.arange(n, device=device) + offset
        k_pos = torch.arange(m, device=device)
        return t5_relative_position_bucket(
            k_pos[None, :] - q_pos[:, None],
            causal=self.causal,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def forward(self, n: int, m: int | None = None, *, offset: int | None = None) -> Tensor:
        """Bias [H, N, M] (add to attention logits [B, H, N, M])."""
        weight = self.relative_attention_bias.weight
        ids = self.buckets(n, m, offset=offset, device=weight.device)
        return self.relative_attention_bias(ids).permute(2, 0, 1) * self.scale
