"""Non-causal linear attention: out = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1).

The key sums are formed once, [M, E + 1] per head (the last column is the normaliser z), so the
cost is O(N M E) and no N x N matrix exists. Masked keys must already have zero features.

Dimensions: B batch, H heads, N queries, L keys, M features, E value width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def with_ones(v: Tensor) -> Tensor:
    """[..., L, E] -> [..., L, E + 1]: a column of ones so that one product gives sum and count."""
    return torch.cat((v, v.new_ones(*v.shape[:-1], 1)), dim=-1)


def normaliser(out: Tensor) -> Tensor:
    """The kernel sums (last column) of [..., E + 1] as divisors [..., 1]: 1 where a row has no
    key (its numerator is zero too, so it gives zeros). A sum may be negative: the generalized
    kernels ELU, GELU, tanh, leaky ReLU and the identity take negative values, and the sum is
    then the divisor as it is, as the references divide."""
    den = out[..., -1:]
    return torch.where(den != 0, den, torch.ones_like(den))


def normalise(out: Tensor) -> Tensor:
    """[..., E + 1] (numerator, kernel sum) -> numerator / kernel sum; zero rows stay zero."""
    return out[..., :-1] / normaliser(out)


def normalise_backward(d_out: Tensor, out: Tensor, den: Tensor) -> Tensor:
    """The gradient of [numerator, kernel sum] [..., E + 1] from that of out = numerator / den
    [..., E] (den from :func:`normaliser`)."""
    return torch.cat((d_out, (d_out * out).sum(-1, keepdim=True).neg_()), dim=-1).div_(den)


def key_value_sums(k: Tensor, v: Tensor) -> Tensor:
    """phi(K)^T [V, 1]: k [B, H, L, M], v [B, H, L, E] -> [B, H, M, E + 1]."""
    return k.transpose(-1, -2) @ with_ones(v)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, kv: Tensor | None = None) -> Tensor:
    """q: [B, H, N, M], k: [B, H, L, M], v: [B, H, L, E] -> [B, H, N, E].

    ``kv`` [B, H, M, E + 1] (from :func:`key_value_sums`) replaces k and v when given, e.g. a
    decoder's cached cross-attention context.
    """
    if kv is None:
        if k.shape[-2] != v.shape[-2] or k.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"k must be [B, H, L, M] and v [B, H, L, E] with M = {q.shape[-1]}, got "
                f"{list(k.shape)} and {list(v.shape)}"
            )
        kv = key_value_sums(k, v)
    return normalise(q @ kv)
