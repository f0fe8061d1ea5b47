"""``vanilla``: the exact-attention baseline every comparison uses.

A pre-norm causal decoder: token embedding -> depth x (attention with rotary positions on the
fused SDPA kernel, then a feed-forward block) -> final norm -> logits. Decoding keeps a KV
cache per layer (``state.layers[i]["kv"]``), so each new token costs one attention row.
In training the feed-forward runs as one lean function with its norm (it keeps its input and
activations, not the normalised input), and calls of at least ``recompute_from`` positions
keep only each block's input, running the block again in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.state import State, state_entry
from longrange.models.vanilla.config import VanillaConfig
from longrange.modules.attention import KVCache, MultiheadAttention
from longrange.modules.feedforward import FeedForward, lean_applies, lean_feed_forward
from longrange.modules.init import init_residual_stack
from longrange.modules.rotary import RotaryEmbedding

# a decoding state holds one per layer: registered so that the state saves and loads
state_entry(KVCache)


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

    def forward(
        self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None, lean_ff: bool = False
    ) -> Tensor:
        """``lean_ff``: the feed-forward keeps only its input and forms its hidden activations
        again in backward, a slice at a time (in a recomputed block, so that the block's
        backward never holds them for the whole sequence)."""
        x = x + self.drop(self.attn(self.attn_norm(x), mask=mask, cache=cache))
        if lean_applies(self.ff, self.ff_norm):
            # keeps neither the normalised input nor more than the activations for backward
            return x + lean_feed_forward(self.ff, x, norm=self.ff_norm, recompute=lean_ff)
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
        outputs = [linear for block in self.blocks for linear in (block.attn.to_out, block.ff.w2)]
        init_residual_stack(self, outputs, config.depth)
        if config.tie_embedding:
            self.head.weight = self.embed.weight

    def _run(self, tokens: Tensor, mask: Tensor | None, layers: list[dict] | None) -> Tensor:
        x = self.drop(self.embed(tokens))
        start = self.config.recompute_from
        recompute = (
            layers is None and start is not None and tokens.shape[1] >= start and torch.is_grad_enabled()
        )
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, mask, None, True, use_reentrant=False)
            else:
                x = block(x, mask=mask, cache=None if layers is None else layers[i]["kv"])
        return self.head(self.norm(x))

    def forward_lm(self, tokens: Tensor, *, mask: Tensor | None = None, state=None) -> LMOutput:
        self.check_tokens(tokens, mask)
        if state is not None:
            raise ValueError("vanilla carries no state across segments; pass state=None")
        return LMOutput(self._run(tokens, mask, None))

    def init_state(self, batch_size: int, device: torch.device | str | None = None, **conditioning) -> State:
        """One KV cache of ``max_seq_len`` positions per layer."""
        self.check_conditioning(conditioning)
        c = self.config
        like = self.embed.weight if device is None else self.embed.weight.new_empty(0, device=device)
        state = State.empty(batch_size, c.depth)
        dim_head = c.dim_head or c.dim // c.heads
        for layer in state.layers:
            layer["kv"] = KVCache.empty(batch_size, c.heads, c.max_seq_len, dim_head, like)
        return state

    def decode(self, tokens: Tensor, state: State) -> Tensor:
        return self._run(tokens, None, state.layers)
