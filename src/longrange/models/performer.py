"""``performer``: the Performer (Choromanski et al. 2021, "Rethinking Attention with Performers").

Attention through FAVOR+ positive orthogonal random features: linear in length, causal by
running sums, O(1) model work per generated token. Layout and keywords follow
``performer_pytorch`` (1.1.4); the reference-named classes (``PerformerLM``, ``Performer``,
``PerformerEncDec``, ``AutoregressiveWrapper``) live in :mod:`longrange.models.performer_compat`,
the layers (``FastAttention``, ``SelfAttention``, ``CrossAttention``) in
:mod:`longrange.models.performer_layers`.

Notable choices (SPEC.md lists the reference defects fixed here):
- causal attention is strictly causal (a running key stabiliser, no feature epsilon) and runs
  in chunks with running sums, never an (n, d, e) tensor, in fp32 / bf16 / fp16 alike;
- padding masks remove masked keys from the normaliser too; token shift honours the mask in
  both branches;
- features are redrawn every ``feature_redraw_interval`` training calls, counted by the
  buffer ``performer.calls_since_last_redraw`` (saved with the weights), never in eval;
  ``check_redraw_projections`` works;
- decoding keeps per-layer running sums, local-head keys and shifted inputs, so greedy
  generation equals full recomputation token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from longrange.models.base import LMOutput, LongRangeLM, RecomputeState
from longrange.models.config import ModelConfig
from longrange.models.performer_layers import (
    KERNEL_FNS,
    Branch,
    CrossAttention,
    FastAttention,
    FeedForwardChunks,
    SelfAttention,
    resolve_kernel_fn,
)
from longrange.models.registry import register_family
from longrange.modules.feedforward import FeedForward
from longrange.modules.positional import (
    AbsolutePositionalEmbedding,
    AxialPositionalEmbedding,
    FixedPositionalEmbedding,
)
from longrange.modules.reversible import ReversibleSequence, SequentialSequence, in_recomputation
from longrange.ops.favor import BACKENDS


@dataclass(kw_only=True)
class PerformerConfig(ModelConfig):
    """The Performer LM. Fields carry the reference's names; ``local_attn_heads`` holds one
    count for every layer or one per layer. longrange-only fields: ``ortho_scaling``,
    ``chunk_size`` and ``attn_backend`` (the causal op), ``feature_eps`` (the epsilon inside
    non-causal softmax features, the reference's 1e-4; causal features carry none),
    ``kernel_eps`` (the generalized kernel's epsilon), ``recompute_attention`` (keep only each
    attention branch's input in training and run the branch again in backward)."""

    family = "performer"

    dim_head: int = 64
    local_attn_heads: tuple[int, ...] = (0,)
    local_window_size: int = 256
    causal: bool = True
    ff_mult: int = 4
    nb_features: int | None = None
    ortho_scaling: int = 0
    feature_redraw_interval: int | None = 1000
    auto_check_redraw: bool = True
    reversible: bool = False
    ff_chunks: int = 1
    ff_glu: bool = False
    emb_dropout: float = 0.0
    ff_dropout: float = 0.0
    attn_dropout: float = 0.0
    generalized_attention: bool = False
    kernel_fn: str = "relu"
    kernel_eps: float = 1e-3
    feature_eps: float = 1e-4
    use_scalenorm: bool = False
    use_rezero: bool = False
    cross_attend: bool = False
    no_projection: bool = False
    tie_embed: bool = False
    rotary_position_emb: bool = True
    axial_position_emb: bool = False
    axial_position_shape: tuple[int, ...] | None = None
    qkv_bias: bool = False
    attn_out_bias: bool = False
    shift_tokens: bool = False
    chunk_size: int = 128
    attn_backend: str = "auto"
    recompute_attention: bool = False

    def local_heads(self) -> tuple[int, ...]:
        """Local attention heads of every layer."""
        heads = self.local_attn_heads
        return heads * self.depth if len(heads) == 1 else heads

    def validate(self) -> None:
        super().validate()
        if isinstance(self.local_attn_heads, int) and not isinstance(self.local_attn_heads, bool):
            self.local_attn_heads = (self.local_attn_heads,)
        self.local_attn_heads = tuple(self.local_attn_heads)
        for name in ("dim_head", "local_window_size", "ff_mult", "ff_chunks", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("nb_features", "feature_redraw_interval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        if len(self.local_attn_heads) not in (1, self.depth):
            raise ValueError(
                f"local_attn_heads must give one count or one per layer (depth {self.depth}), "
                f"got {self.local_attn_heads!r}"
            )
        for n in self.local_heads():
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.heads:
                raise ValueError(f"local_attn_heads must be ints in [0, heads={self.heads}], got {n!r}")
        for name in ("emb_dropout", "ff_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if self.ortho_scaling not in (0, 1):
            raise ValueError(f"ortho_scaling must be 0 or 1, got {self.ortho_scaling!r}")
        if self.kernel_fn not in (*KERNEL_FNS, "custom"):
            raise ValueError(
                f"kernel_fn must be one of {sorted(KERNEL_FNS)} or 'custom', got {self.kernel_fn!r}"
            )
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")
        if self.use_scalenorm and self.use_rezero:
            raise ValueError("use_scalenorm and use_rezero exclude each other; pick one")
        if self.no_projection and self.generalized_attention:
            raise ValueError("no_projection and generalized_attention exclude each other; pick one")
        if self.no_projection and self.nb_features is not None:
            raise ValueError("nb_features has no effect with no_projection=True")
        if self.kernel_fn != "relu" and not self.generalized_attention:
            raise ValueError("kernel_fn is used only with generalized_attention=True")
        if self.rotary_position_emb and self.axial_position_emb:
            raise ValueError(
                "rotary_position_emb and axial_position_emb exclude each other (the reference "
                "silently used rotary); pass rotary_position_emb=False for axial positions"
            )
        if self.axial_position_shape is not None:
            shape = self.axial_position_shape = tuple(self.axial_position_shape)
            if not self.axial_position_emb:
                raise ValueError("axial_position_shape needs axial_position_emb=True")
            if math.prod(shape) < self.max_seq_len:
                raise ValueError(f"axial_position_shape {shape} covers fewer than max_seq_len positions")
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary positions), got {self.dim_head}")
        if self.dim % 2:
            raise ValueError(f"dim must be even (sinusoidal positions), got {self.dim}")

    @property
    def norm_kind(self) -> str:
        return "scale" if self.use_scalenorm else "rezero" if self.use_rezero else "layer"


def performer_tiny() -> PerformerConfig:
    return PerformerConfig(dim=64, depth=2, heads=2, dim_head=32, nb_features=64, max_seq_len=256)


def performer_small() -> PerformerConfig:
    """Like the reference's enwik8 example, scaled down: local heads in the lower layers,
    token shift, 128 features."""
    return PerformerConfig(
        dim=256,
        depth=4,
        heads=4,
        dim_head=64,
        local_attn_heads=(2, 2, 1, 1),
        local_window_size=128,
        nb_features=128,
        shift_tokens=True,
        max_seq_len=512,
    )


def performer_bench() -> PerformerConfig:
    """The shared benchmark size (dim 256, depth 4, heads 4), all heads FAVOR+, tuned for long
    inputs: 64 features (one orthogonal block; the default D log D would be 266), chunks of 64,
    attention branches recomputed in backward and the feed-forward formed a quarter of the
    sequence at a time, so that a layer keeps little more than its input for backward."""
    return PerformerConfig(
        dim=256,
        depth=4,
        heads=4,
        dim_head=64,
        nb_features=64,
        chunk_size=64,
        recompute_attention=True,
        ff_chunks=4,
        max_seq_len=65536,
    )


class PerformerBody(nn.Module):
    """The block stack: x [B, N, dim] -> [B, N, dim]. Keywords: ``pos_emb`` (a sinusoid table
    [1, N, dim_head] for rotary positions), ``mask`` [B, N], ``context`` [B, L, dim] and
    ``context_mask`` [B, L] (cross-attending stacks)."""

    def __init__(self, config: PerformerConfig, *, kernel_fn: Any = None) -> None:
        super().__init__()
        c = config
        self.config = c
        if c.kernel_fn == "custom" and kernel_fn is None:
            raise ValueError("this config has kernel_fn='custom': pass the kernel function as kernel_fn=")
        kernel = resolve_kernel_fn(c.kernel_fn if kernel_fn is None else kernel_fn)[1]
        shifts = ((0, 1) if c.causal else (-1, 0, 1)) if c.shift_tokens else None
        attn_kwargs = dict(
            heads=c.heads,
            dim_head=c.dim_head,
            nb_features=c.nb_features,
            feature_redraw_interval=None,
            generalized_attention=c.generalized_attention,
            kernel_fn=kernel if c.generalized_attention else None,
            dropout=c.attn_dropout,
            no_projection=c.no_projection,
            qkv_bias=c.qkv_bias,
            attn_out_bias=c.attn_out_bias,
            ortho_scaling=c.ortho_scaling,
            chunk_size=c.chunk_size,
            backend=c.attn_backend,
            feature_eps=c.feature_eps,
            kernel_eps=c.kernel_eps,
        )

        def ff() -> nn.Module:
            return FeedForwardChunks(
                c.ff_chunks, FeedForward(c.dim, mult=c.ff_mult, dropout=c.ff_dropout, glu=c.ff_glu)
            )

        blocks, self_blocks = [], []
        for local in c.local_heads():
            self_blocks.append(len(blocks))
            attn = SelfAttention(
                c.dim,
                causal=c.causal,
                local_heads=local,
                local_window_size=c.local_window_size,
                **attn_kwargs,
            )
            blocks.append(
                (
                    Branch(c.dim, attn, norm=c.norm_kind, shifts=shifts, recompute=c.recompute_attention),
                    Branch(c.dim, ff(), norm=c.norm_kind, shifts=shifts),
                )
            )
            if c.cross_attend:
                cross = CrossAttention(c.dim, causal=False, **attn_kwargs)
                blocks.append(
                    (
                        Branch(c.dim, cross, norm=c.norm_kind, shifts=None, recompute=c.recompute_attention),
                        Branch(c.dim, ff(), norm=c.norm_kind, shifts=None),
                    )
                )
        in_self = tuple((i in self_blocks, False) for i in range(len(blocks)))
        in_cross = tuple((i not in self_blocks, False) for i in range(len(blocks)))
        routes: dict[str, Any] = {"mask": (True, True), "pos_emb": in_self}
        if c.cross_attend:
            routes.update(context=in_cross, context_mask=in_cross)
        stack = ReversibleSequence if c.reversible else SequentialSequence
        self.layers = stack(blocks, args_route=routes)
        self.feature_redraw_interval = c.feature_redraw_interval
        self.auto_check_redraw = c.auto_check_redraw
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def fast_attentions(self) -> list[FastAttention]:
        return [m for m in self.modules() if isinstance(m, FastAttention)]

    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        """Draw new features for every attention layer now."""
        for module in self.fast_attentions():
            module.redraw_projection_matrix(generator=generator)

    def check_redraw_projections(self) -> None:
        """Count one training call; redraw every layer's features once the interval is reached."""
        interval = self.feature_redraw_interval
        if not self.training or interval is None or in_recomputation():
            return
        if int(self.calls_since_last_redraw) >= interval:
            self.redraw_projections()
            self.calls_since_last_redraw.zero_()
        self.calls_since_last_redraw += 1

    def fix_projection_matrices_(self) -> None:
        """Never redraw the features again."""
        self.feature_redraw_interval = None

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        if self.auto_check_redraw:
            self.check_redraw_projections()
        if self.config.cross_attend and kwargs.get("context") is None:
            raise ValueError("this stack has cross_attend=True: pass context [B, L, dim]")
        if not self.config.cross_attend and kwargs.get("context") is not None:
            raise ValueError("context was given but the stack has cross_attend=False")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.layers(x, **kwargs)[0]

    @torch.no_grad()
    def forward_cached(self, x: Tensor, caches: list[tuple[dict, dict]], **kwargs) -> Tensor:
        """Decoding pass: the maths of :meth:`forward` on new positions, continuing from (and
        updating) one cache per branch. Keywords: pos_emb, position, context, context_mask."""
        own = {k: v for k, v in kwargs.items() if k in ("pos_emb", "position")}
        cross = {k: v for k, v in kwargs.items() if k in ("context", "context_mask")}
        step = 2 if self.config.cross_attend else 1
        routed = [own if i % step == 0 else cross for i in range(len(caches))]
        if self.config.reversible:
            x1 = x2 = x
            for block, (cf, cg), kw in zip(self.layers.blocks, caches, routed):
                x1 = x1 + block.f(x2, cache=cf, **kw)
                x2 = x2 + block.g(x1, cache=cg)
            return (x1 + x2) / 2
        for block, (cf, cg), kw in zip(self.layers.blocks, caches, routed):
            x = x + block.f(x, cache=cf, **kw)
            x = x + block.g(x, cache=cg)
        return x


@dataclass
class PerformerState:
    """Decoding state: positions seen so far and one cache per (block, branch); the context
    of a cross-attending decoder is kept with it."""

    position: int
    caches: list[tuple[dict, dict]] = field(default_factory=list)
    context: Tensor | None = None
    context_mask: Tensor | None = None


class PerformerModel(LongRangeLM):
    """Performer language model: tokens [B, N] -> logits [B, N, V]."""

    config_class = PerformerConfig

    def __init__(self, config: PerformerConfig, *, kernel_fn: Any = None) -> None:
        super().__init__(config)
        c = config
        self.max_seq_len = c.max_seq_len
        self.token_emb = nn.Embedding(c.vocab_size, c.dim)
        self.layer_pos_emb = None
        if c.rotary_position_emb:
            self.pos_emb = FixedPositionalEmbedding(c.dim, c.max_seq_len)
            self.layer_pos_emb = FixedPositionalEmbedding(c.dim_head, c.max_seq_len)
        elif c.axial_position_emb:
            shape = c.axial_position_shape or (math.ceil(c.max_seq_len / 64), 64)
            self.pos_emb = AxialPositionalEmbedding(c.dim, shape)
        else:
            self.pos_emb = AbsolutePositionalEmbedding(c.dim, c.max_seq_len)
        self.dropout = nn.Dropout(c.emb_dropout)
        self.performer = PerformerBody(c, kernel_fn=kernel_fn)
        self.norm = nn.LayerNorm(c.dim)
        self.to_out = None if c.tie_embed else nn.Linear(c.dim, c.vocab_size)
        # (context, context_mask) that a state-less prefill uses when given none; set by the
        # autoregressive wrapper around a generate call of an encoder-decoder
        self.decode_context: tuple[Tensor, Tensor | None] | None = None

    # --- the reference's redraw controls ----------------------------------------------------
    def check_redraw_projections(self) -> None:
        self.performer.check_redraw_projections()

    def fix_projection_matrices_(self) -> None:
        self.performer.fix_projection_matrices_()
        self.config = self.config.replace(feature_redraw_interval=None)

    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        self.performer.redraw_projections(generator)

    # --- the shared flow --------------------------------------------------------------------
    def _embed(self, tokens: Tensor, offset: int) -> tuple[Tensor, Tensor | None]:
        x = self.token_emb(tokens)
        x = self.dropout(x + self.pos_emb(x, offset=offset))
        layer_pos = None if self.layer_pos_emb is None else self.layer_pos_emb(x, offset=offset)
        return x, layer_pos

    def _head(self, x: Tensor, return_encodings: bool = False) -> Tensor:
        x = self.norm(x)
        if return_encodings:
            return x
        return x @ self.token_emb.weight.t() if self.to_out is None else self.to_out(x)

    def run(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        return_encodings: bool = False,
    ) -> Tensor:
        """tokens [B, N] -> logits [B, N, V] (or the final-norm encodings [B, N, dim])."""
        self.check_tokens(tokens, mask)
        self._check_context(tokens, context, context_mask)
        x, layer_pos = self._embed(tokens, 0)
        x = self.performer(x, pos_emb=layer_pos, mask=mask, context=context, context_mask=context_mask)
        return self._head(x, return_encodings)

    def _check_context(self, tokens: Tensor, context: Tensor | None, context_mask: Tensor | None) -> None:
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without a context")
            return
        if context.dim() != 3 or context.shape[0] != tokens.shape[0] or context.shape[2] != self.config.dim:
            raise ValueError(
                f"context must be [B={tokens.shape[0]}, L, dim={self.config.dim}], got {list(context.shape)}"
            )
        if context_mask is not None and (
            context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]
        ):
            raise ValueError(f"context_mask must be a bool tensor {list(context.shape[:2])}")

    def forward_lm(self, tokens: Tensor, *, mask: Tensor | None = None, state=None) -> LMOutput:
        if state is not None:
            raise ValueError("performer carries no state across training segments; pass state=None")
        return LMOutput(self.run(tokens, mask=mask))

    # --- incremental decoding ----------------------------------------------------------------
    def prefill(
        self,
        tokens: Tensor,
        state: PerformerState | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, PerformerState]:
        """Run tokens [B, N] (from the start, or continuing ``state``); return logits [B, N, V]
        and the state holding every layer's running sums. A cross-attending decoder takes its
        ``context`` here (kept in the state for the following steps)."""
        if not self.config.causal:
            # a bidirectional model has no running state: every step re-runs the window
            if context is not None or self.config.cross_attend:
                raise ValueError("decoding with a context needs causal=True")
            return super().prefill(tokens, state)
        if state is None:
            if context is None and self.decode_context is not None:
                context, context_mask = self.decode_context
            caches = [({}, {}) for _ in self.performer.layers.blocks]
            state = PerformerState(0, caches, context, context_mask)
        elif context is not None:
            raise ValueError("the context is fixed by the first prefill; do not pass it again")
        self.check_tokens(tokens)
        self._check_context(tokens, state.context, state.context_mask)
        if self.config.cross_attend and state.context is None:
            raise ValueError("this decoder has cross_attend=True: pass context= to prefill")
        if state.position + tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"positions up to {state.position + tokens.shape[1]} exceed "
                f"max_seq_len={self.config.max_seq_len}"
            )
        return self._decode(tokens, state), state

    def step(self, token: Tensor, state: PerformerState) -> tuple[Tensor, PerformerState]:
        if token.dim() != 1:
            raise ValueError(f"step takes one token per row, shape [B], got {list(token.shape)}")
        if isinstance(state, RecomputeState):
            return super().step(token, state)
        logits, state = self.prefill(token[:, None], state)
        return logits[:, -1], state

    @torch.no_grad()
    def _decode(self, tokens: Tensor, state: PerformerState) -> Tensor:
        x, layer_pos = self._embed(tokens, state.position)
        kwargs: dict[str, Any] = {"position": state.position}
        if layer_pos is not None:
            kwargs["pos_emb"] = layer_pos
        if state.context is not None:
            kwargs["context"] = state.context
            if state.context_mask is not None:
                kwargs["context_mask"] = state.context_mask
        x = self.performer.forward_cached(x, state.caches, **kwargs)
        state.position += tokens.shape[1]
        return self._head(x)


register_family(
    "performer",
    PerformerConfig,
    PerformerModel,
    {"tiny": performer_tiny, "small": performer_small, "bench": performer_bench},
    description="Performer: FAVOR+ random-feature attention, linear in length, running-sum decoding",
)

_COMPAT_NAMES = ("AutoregressiveWrapper", "Performer", "PerformerEncDec", "PerformerLM")


def __getattr__(name: str):
    # the reference-named classes subclass the ones above, so they load on first use
    if name in _COMPAT_NAMES:
        from longrange.models import performer_compat

        return getattr(performer_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CrossAttention",
    "FastAttention",
    "PerformerBody",
    "PerformerConfig",
    "PerformerModel",
    "PerformerState",
    "SelfAttention",
    "performer_bench",
    "performer_small",
    "performer_tiny",
    *_COMPAT_NAMES,
]
