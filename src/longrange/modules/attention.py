"""Multi-head attention weights with a KV cache; the math lives in ``longrange.ops.dense``.

Dimensions: B batch, N queries, M keys, H heads, D head width, C model width (``dim``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longrange.modules.rotary import RotaryEmbedding
from longrange.ops.dense import dense_attention


@dataclass
class KVCache:
    """Keys and values of one attention layer, preallocated to ``capacity`` positions."""

    keys: Tensor  # [B, H, capacity, D], rotated already
    values: Tensor  # [B, H, capacity, D]
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, dim_head: int, like: Tensor) -> KVCache:
        shape = (batch, heads, capacity, dim_head)
        return cls(like.new_zeros(shape), like.new_zeros(shape), 0)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, D] after the cached ones; return all cached keys and values."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: capacity {self.keys.shape[2]}, need {end}")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class MultiheadAttention(nn.Module):
    """Causal or bidirectional self-attention (or cross-attention with ``context``).

    Rotary positions are applied to queries and keys when ``rotary`` is given; ``backend``
    selects the exact-attention op ("sdpa" or "naive").
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int | None = None,
        causal: bool = True,
        dropout: float = 0.0,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        dim_head = dim_head or dim // heads
        self.heads, self.dim_head, self.causal = heads, dim_head, causal
        self.dropout, self.rotary, self.backend = dropout, rotary, backend
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)

    def _split(self, t: Tensor) -> Tensor:
        """[B, N, H * D] -> [B, H, N, D] (a view)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x [B, N, C]; mask [B, N] (True = keep) for self-attention, context_mask [B, M] for
        cross-attention. With ``cache`` the new keys/values are appended and the queries (at
        positions cache.length ...) attend to everything cached."""
        q = self._split(self.to_q(x))
        source = x if context is None else context
        k, v = (self._split(t) for t in self.to_kv(source).chunk(2, dim=-1))
        key_mask = mask if context is None else context_mask
        start = cache.length if cache is not None else 0
        if self.rotary is not None and context is None:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = self.rotary.rotate_queries_and_keys(q, k, pos, pos)
        if cache is not None:
            if key_mask is not None:
                raise ValueError("a padding mask cannot be combined with a KV cache")
            k, v = cache.append(k, v)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = dense_attention(
            q,
            k,
            v,
            mask=attn_mask,
            causal=self.causal and context is None,
            dropout=self.dropout if self.training else 0.0,
            backend=self.backend,
        )
        return self.to_out(out.transpose(1, 2).flatten(2))
