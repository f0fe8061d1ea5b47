"""``performer``: the Performer (Choromanski et al. 2021, "Rethinking Attention with Performers").

Attention through FAVOR+ positive orthogonal random features: linear in length, causal by
running sums, O(1) model work per generated token. Layout and keywords follow
``performer_pytorch`` (1.1.4); the reference-named classes live in
:mod:`longrange.models.performer.compat`.

Notable choices (the reference's defects fixed here):
- causal attention is strictly causal (a running key stabiliser, no feature epsilon) and runs
  in chunks with running sums, never an (n, d, e) tensor, in fp32 / bf16 / fp16 alike;
- padding masks remove masked keys from the normaliser too; token shift honours the mask in
  both branches;
- features are redrawn every ``feature_redraw_interval`` training calls, counted by the
  buffer ``performer.calls_since_last_redraw`` (saved with the weights), never in eval;
  ``check_redraw_projections`` works. A forward under ``torch.compile`` does not count (the
  count is read on the host): whoever compiles it calls ``before_compiled_step()`` per
  training call, as ``longrange train --compile`` does;
- decoding keeps per-layer running sums (with their running maximum), local-head keys and
  shifted inputs in ``state.layers[i]["attn"]`` / ``["ff"]``, and a decoder's ``context`` in
  ``state.shared``, so greedy generation equals full recomputation token for token
  (docs/ARCHITECTURE.md, "State"). A bidirectional model re-runs its window instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.performer.config import PerformerConfig
from longrange.models.performer.fast_attention import FastAttention, resolve_kernel_fn
from longrange.models.performer.layers import CrossAttention, FeedForwardChunks, SelfAttention
from longrange.models.state import State
from longrange.modules.branch import Branch
from longrange.modules.feedforward import FeedForward
from longrange.modules.positional import (
    AbsolutePositionalEmbedding,
    AxialPositionalEmbedding,
    FixedPositionalEmbedding,
)
from longrange.modules.reversible import ReversibleSequence, SequentialSequence, in_recomputation

CONTEXT_KEYS = ("context", "context_mask")


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

        def branch(fn: nn.Module, shift: bool, recompute: bool = False) -> Branch:
            # the reference's ReZero gate is a scalar starting at 1e-3
            return Branch(
                c.dim,
                fn,
                norm=c.norm_kind,
                shifts=shifts if shift else None,
                recompute=recompute,
                gate_init=1e-3,
                gate_shape=(),
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
            blocks.append((branch(attn, True, c.recompute_attention), branch(ff(), True)))
            if c.cross_attend:
                cross = CrossAttention(c.dim, causal=False, **attn_kwargs)
                blocks.append((branch(cross, False, c.recompute_attention), branch(ff(), False)))
        in_self = tuple((i in self_blocks, False) for i in range(len(blocks)))
        in_cross = tuple((i not in self_blocks, False) for i in range(len(blocks)))
        # ``position`` (the first position of a decoding call) reaches the local heads
        routes: dict[str, Any] = {"mask": (True, True), "pos_emb": in_self, "position": in_self}
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
        # the counter is read on the host: a compiled forward leaves it to
        # ``PerformerModel.before_compiled_step``, which the trainer calls outside the graph
        if self.auto_check_redraw and not torch.compiler.is_compiling():
            self.check_redraw_projections()
        if self.config.cross_attend and kwargs.get("context") is None:
            raise ValueError("this stack has cross_attend=True: pass context [B, L, dim]")
        if not self.config.cross_attend and kwargs.get("context") is not None:
            raise ValueError("context was given but the stack has cross_attend=False")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.layers(x, **kwargs)[0]


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

    @property
    def conditioning_keys(self) -> tuple[str, ...]:
        """A causal cross-attending decoder takes its encoder's context when a state is made;
        otherwise no conditioning (a bidirectional model re-runs its window to decode)."""
        return CONTEXT_KEYS if self.config.cross_attend and self.config.causal else ()

    # --- the reference's redraw controls ----------------------------------------------------
    def check_redraw_projections(self) -> None:
        self.performer.check_redraw_projections()

    def fix_projection_matrices_(self) -> None:
        self.performer.fix_projection_matrices_()
        self.config = self.config.replace(feature_redraw_interval=None)

    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        self.performer.redraw_projections(generator)

    def before_compiled_step(self) -> None:
        if self.performer.auto_check_redraw:
            self.check_redraw_projections()

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
        self._check_context(tokens.shape[0], context, context_mask)
        x, layer_pos = self._embed(tokens, 0)
        x = self.performer(x, pos_emb=layer_pos, mask=mask, context=context, context_mask=context_mask)
        return self._head(x, return_encodings)

    def _check_context(self, batch: int, context: Tensor | None, context_mask: Tensor | None) -> None:
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without a context")
            return
        if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != self.config.dim:
            raise ValueError(
                f"context must be [B={batch}, L, dim={self.config.dim}], got {list(context.shape)}"
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
    def init_state(self, batch_size: int, device: torch.device | str | None = None, **conditioning) -> State:
        """Empty per-branch dicts for every block (filled by the first ``decode``); a
        cross-attending decoder's ``context`` / ``context_mask`` kept in ``state.shared``."""
        if not self.config.causal:
            if conditioning.get("context") is not None:
                raise ValueError("decoding with a context needs causal=True")
            return super().init_state(batch_size, device, **conditioning)
        self.check_conditioning(conditioning)
        shared = {k: v for k, v in conditioning.items() if v is not None}
        if self.config.cross_attend and "context" not in shared:
            raise ValueError("this decoder has cross_attend=True: pass context= to prefill")
        self._check_context(batch_size, shared.get("context"), shared.get("context_mask"))
        return State.empty(batch_size, len(self.performer.layers.blocks), **shared)

    def decode(self, tokens: Tensor, state: State) -> Tensor:
        if not self.config.causal:
            return super().decode(tokens, state)
        x, layer_pos = self._embed(tokens, state.position)
        kwargs: dict[str, Any] = {"position": state.position, **state.shared}
        if layer_pos is not None:
            kwargs["pos_emb"] = layer_pos
        return self._head(self.performer.layers.forward_cached(x, state.layers, **kwargs))
