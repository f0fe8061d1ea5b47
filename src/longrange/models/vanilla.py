"""``vanilla``: the exact-attention baseline every comparison uses.

A pre-norm causal decoder: token embedding -> depth x (attention with rotary positions on the
fused SDPA kernel, then a feed-forward block) -> final norm -> logits. Decoding keeps a KV
cache per layer, so each new token costs one attention row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.config import ModelConfig
from longrange.models.registry import register_family
from longrange.modules.attention import KVCache, MultiheadAttention
from longrange.modules.feedforward import FeedForward
from longrange.modules.rotary import RotaryEmbedding


@dataclass(kw_only=True)
class VanillaConfig(ModelConfig):
    family = "vanilla"

    dim_head: int | None = None
    ff_mult: int = 4
    ff_glu: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    rotary_theta: float = 10000.0
    tie_embedding: bool = True
    attn_backend: Literal["sdpa", "naive"] = "sdpa"

    def validate(self) -> None:
        super().validate()
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.attn_backend not in ("sdpa", "naive"):
            raise ValueError(f"attn_backend must be 'sdpa' or 'naive', got {self.attn_backend!r}")
        for name in ("dropout", "attn_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if (self.dim_head or self.dim // self.heads) % 2:
            raise ValueError("the head width (dim_head or dim // heads) must be even for rotary")


def vanilla_tiny() -> VanillaConfig:
    return VanillaConfig(dim=64, depth=2, heads=2, max_seq_len=256)


def vanilla_small() -> VanillaConfig:
    return VanillaConfig(dim=256, depth=4, heads=4, max_seq_len=256)


def vanilla_bench() -> VanillaConfig:
    """The benchmark configuration shared by every family: dim 256, depth 4, heads 4."""
    return VanillaConfig(dim=256, depth=4, heads=4, max_seq_len=65536)


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


class VanillaBlock(nn.Module):
    def __init__(self, config: VanillaConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.attn_norm = _norm(config.norm, config.dim)
        self.attn = MultiheadAttention(
            config.dim,
            heads=config.heads,
            dim_head=config.dim_head,
            causal=True,
            dropout=config.attn_dropout,
            rotary=rotary,
            backend=config.attn_backend,
        )
        self.ff_norm = _norm(config.norm, config.dim)
        self.ff = FeedForward(config.dim, mult=config.ff_mult, dropout=config.dropout, glu=config.ff_glu)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), mask=mask, cache=cache))
        return x + self.ff(self.ff_norm(x))


class VanillaLM(LongRangeLM):
    """Exact causal attention decoder. ``forward(tokens, mask=None)`` -> logits [B, N, V]."""

    config_class = VanillaConfig

    def __init__(self, config: VanillaConfig) -> None:
        super().__init__(config)
        dim_head = config.dim_head or config.dim // config.heads
        self.rotary = RotaryEmbedding(dim_head, theta=config.rotary_theta)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(VanillaBlock(config, self.rotary) for _ in range(config.depth))
        self.norm = _norm(config.norm, config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:
            # Residual projections shrink with depth so the residual stream starts near unit scale.
            nn.init.normal_(block.attn.to_out.weight, std=0.02 / (2 * config.depth) ** 0.5)
            nn.init.normal_(block.ff.w2.weight, std=0.02 / (2 * config.depth) ** 0.5)
        if config.tie_embedding:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _run(self, tokens: Tensor, mask: Tensor | None, caches: list[KVCache] | None) -> Tensor:
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=None if caches is None else caches[i])
        return self.head(self.norm(x))

    def forward_lm(self, tokens: Tensor, *, mask: Tensor | None = None, state=None) -> LMOutput:
        self.check_tokens(tokens, mask)
        if state is not None:
            raise ValueError("vanilla carries no state across segments; pass state=None")
        return LMOutput(self._run(tokens, mask, None))

    def new_caches(self, batch: int, capacity: int, like: Tensor) -> list[KVCache]:
        c = self.config
        dim_head = c.dim_head or c.dim // c.heads
        return [KVCache.empty(batch, c.heads, capacity, dim_head, like) for _ in self.blocks]

    def prefill(self, tokens: Tensor, state: list[KVCache] | None = None) -> tuple[Tensor, list[KVCache]]:
        self.check_tokens(tokens)
        if state is None:
            state = self.new_caches(tokens.shape[0], self.config.max_seq_len, self.embed.weight)
        return self._run(tokens, None, state), state

    def step(self, token: Tensor, state: list[KVCache]) -> tuple[Tensor, list[KVCache]]:
        if state[0].length >= self.config.max_seq_len:
            raise ValueError(f"the KV cache is full (max_seq_len={self.config.max_seq_len})")
        return self._run(token[:, None], None, state)[:, -1], state


register_family(
    "vanilla",
    VanillaConfig,
    VanillaLM,
    {"tiny": vanilla_tiny, "small": vanilla_small, "bench": vanilla_bench},
    description="exact causal attention (SDPA), rotary positions; the baseline",
)
