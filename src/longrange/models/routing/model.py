"""``routing``: the Routing Transformer (Roy, Saffar, Vaswani, Grangier 2021, TACL).

Content-based sparse attention: online spherical k-means routes queries and keys into clusters
and attention runs inside each cluster, O(n^1.5) when there are sqrt(n) clusters of sqrt(n)
tokens; local heads beside the routed ones see a sliding window. The layout and keywords are
those of the ``routing_transformer`` package (1.6.1); the reference-named classes
(``RoutingTransformerLM`` ...) are in :mod:`longrange.models.routing.compat`.

Notable choices:
- causal routing is strictly causal: each token goes to its nearest centroid and a query sees
  the ``window_size`` most recent keys of its own cluster plus the cluster's memory key
  (:mod:`longrange.ops.routing.causal`); the reference's balanced routing (top-W per cluster
  over the whole sequence) is kept for non-causal attention;
- the number of clusters is ``max_seq_len // window_size``, as in the reference;
- k-means centroids move after backward, once per backward pass, through a removable handle;
  never during reversible recomputation or in eval. They are initialised from the first batch
  a layer sees: a one-time update made before that forward, like the later ones;
- token shift, MoE and the k-means statistics honour the padding mask; ``commitment_factor``,
  ``ff_mult`` and ``use_absolute_pos_emb`` are all live;
- decoding (docs/ARCHITECTURE.md, "State") keeps each block's branch caches in
  ``state.layers[i]["attn"]`` / ``["ff"]`` (local keys of the last windows, per-cluster ring
  buffers of routed keys, the context's routed keys cached at the first call, shifted
  inputs), so a new token costs O(window) per layer. MoE layers (their capacity depends on
  the length of the call), ``return_embeddings`` and non-causal models re-run their window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.routing.config import RoutingConfig
from longrange.models.routing.layers import ACTIVATIONS, Branch, SelfAttention
from longrange.models.routing.routed import KmeansAttention, KmeansUpdateHandle, KmeansUpdates
from longrange.models.state import State
from longrange.modules.chunked_feedforward import ChunkedFeedForward
from longrange.modules.feedforward import Chunk
from longrange.modules.moe import MoE
from longrange.modules.pkm import PKM
from longrange.modules.positional import AbsolutePositionalEmbedding
from longrange.modules.project import ProjectInOut
from longrange.modules.reversible import ReversibleSequence, SequentialSequence


class RoutingBody(KmeansUpdates, nn.Module):
    """The block stack: x [B, N, dim] -> (x, aux_loss). Keywords: ``input_mask`` [B, N],
    ``pos_emb`` (positions [N]), ``context`` [B, M, dim] and ``context_mask`` [B, M]."""

    def __init__(self, config: RoutingConfig, *, activation: type[nn.Module] | nn.Module | None = None):
        super().__init__()
        c = config
        self.config = c
        if activation is None and c.ff_activation is not None:
            activation = ACTIVATIONS[c.ff_activation]
        shared_qk = c.causal if c.shared_qk is None else c.shared_qk
        norm = None if c.use_rezero else ("scale" if c.use_scale_norm else "layer")
        shifts = ((0, 1) if c.causal else (-1, 0, 1)) if c.shift_tokens else None
        common = dict(
            dim=c.dim,
            depth=c.depth,
            max_seq_len=c.max_seq_len,
            heads=c.heads,
            window_size=c.window_size,
            dim_head=c.dim_head,
            local_attn_window_size=c.local_attn_window_size,
            local_attn_radius_blocks=c.local_attn_radius_blocks,
            attn_dropout=c.attn_dropout,
            dropout=c.attn_layer_dropout,
            kmeans_ema_decay=c.kmeans_ema_decay,
            commitment_factor=c.commitment_factor,
            num_mem_kv=c.num_mem_kv,
        )

        def ff() -> nn.Module:
            inner = ChunkedFeedForward(
                c.dim, mult=c.ff_mult, dropout=c.ff_dropout, activation=activation, glu=c.ff_glu
            )
            return Chunk(c.ff_chunks, inner, along_dim=1)

        makers = {
            "attn": lambda local: SelfAttention(
                local_attn_heads=local,
                causal=c.causal,
                rel_pos_emb=c.rel_pos_emb,
                shared_qk=shared_qk,
                **common,
            ),
            "ff": ff,
            "context_attn": lambda: SelfAttention(
                local_attn_heads=0,
                causal=c.causal,
                receives_context=True,
                context_window_size=c.context_window_size,
                shared_qk=c.context_shared_qk,
                **common,
            ),
            "context_ff": ff,
            "pkm": lambda: PKM(c.dim, num_keys=c.pkm_num_keys, dim_head=128),
            "moe": lambda: MoE(
                c.dim, num_experts=c.moe_num_experts, loss_coef=c.moe_loss_coef, causal=c.causal
            ),
        }
        tied: dict[str, nn.Module] = {}

        def make(kind: str, *args) -> nn.Module:
            if not c.weight_tie:
                return makers[kind](*args)
            if kind not in tied:
                tied[kind] = makers[kind](*args)
            return tied[kind]

        def block(attn: nn.Module, ff: nn.Module) -> tuple[Branch, Branch]:
            return (
                Branch(c.dim, attn, norm=norm, shifts=shifts, attn=True),
                Branch(c.dim, ff, norm=norm, shifts=shifts, attn=False),
            )

        blocks, self_attn_blocks = [], []
        for i, local in enumerate(c.local_heads()):
            layer = i + 1
            kind = "moe" if layer in c.moe_layers else ("pkm" if layer in c.pkm_layers else "ff")
            self_attn_blocks.append(len(blocks))
            blocks.append(block(make("attn", local), make(kind)))
            if c.receives_context:
                blocks.append(block(make("context_attn"), make("context_ff")))
        self.self_attn_blocks = tuple(self_attn_blocks)
        in_self = tuple((i in self_attn_blocks, False) for i in range(len(blocks)))
        in_context = tuple((i not in self_attn_blocks, False) for i in range(len(blocks)))
        routes: dict[str, Any] = {"input_mask": (True, True), "pos_emb": in_self}
        if c.receives_context:
            routes.update(context=in_context, context_mask=in_context)
        stack = ReversibleSequence if c.reversible else SequentialSequence
        self.layers = stack(blocks, layer_dropout=c.layer_dropout, args_route=routes)
        for module in self.modules():
            if isinstance(module, KmeansAttention):
                module.checkpoint = c.checkpoint_routed_attention
        has_local = any(n > 0 for n in c.local_heads())
        local_window = c.local_attn_window_size or c.window_size
        self.pad_multiple = local_window if has_local else 0
        if c.kmeans_update_on_backward:
            self.register_kmeans_update()

    def forward(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.layers(x, **kwargs)


class RoutingLM(LongRangeLM):
    """Routing Transformer language model: tokens [B, N] -> logits [B, N, V] (+ aux loss).

    A model with ``receives_context`` is a decoder: it takes ``context`` [B, M, dim] (and
    ``context_mask`` [B, M]) in :meth:`run` and as the conditioning of ``prefill``."""

    config_class = RoutingConfig

    def __init__(
        self, config: RoutingConfig, *, activation: type[nn.Module] | nn.Module | None = None
    ) -> None:
        super().__init__(config)
        c = config
        if c.receives_context:
            self.conditioning_keys = ("context", "context_mask")
        emb_dim = c.emb_dim or c.dim
        self.max_seq_len = c.max_seq_len
        self.token_emb = nn.Embedding(c.vocab_size, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.abs_pos_emb = (
            AbsolutePositionalEmbedding(emb_dim, c.max_seq_len) if c.use_absolute_pos_emb else None
        )
        if self.abs_pos_emb is not None:
            nn.init.normal_(self.abs_pos_emb.emb.weight, std=0.02)
        body = RoutingBody(c, activation=activation)
        projected = emb_dim != c.dim
        self.routing_transformer = (
            ProjectInOut(body, emb_dim, c.dim, project_out=not c.return_embeddings) if projected else body
        )
        out_width = c.dim if projected and c.return_embeddings else emb_dim
        self.norm = nn.LayerNorm(out_width)
        self.out = None
        if not c.return_embeddings and not c.tie_embedding:
            self.out = nn.Linear(emb_dim, c.vocab_size)

    @property
    def body(self) -> RoutingBody:
        rt = self.routing_transformer
        return rt.fn if isinstance(rt, ProjectInOut) else rt

    @property
    def pad_multiple(self) -> int:
        return self.body.pad_multiple

    def _embed(self, tokens: Tensor, offset: int) -> Tensor:
        x = self.token_emb(tokens)
        if self.abs_pos_emb is not None:
            x = x + self.abs_pos_emb(x, offset=offset)
        return x

    def _head(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.config.return_embeddings:
            return x
        if self.out is None:
            return x @ self.token_emb.weight.t()
        return self.out(x)

    def _check_context(self, context: Tensor | None, where: str) -> None:
        if self.config.receives_context and context is None:
            raise ValueError(f"this model has receives_context=True: pass context {where}")
        if context is not None and not self.config.receives_context:
            raise ValueError("context was given but the model has receives_context=False")

    def run(
        self,
        tokens: Tensor,
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """tokens [B, N] -> (logits [B, N, V] or embeddings, aux loss)."""
        self._check_context(context, "[B, M, dim]")
        self.body.layers.set_f_recompute(self.training and self.config.recompute_for(tokens.numel()))
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x, aux = self.routing_transformer(
            self._embed(tokens, 0),
            input_mask=input_mask,
            pos_emb=positions,
            context=context,
            context_mask=context_mask,
        )
        return self._head(x), aux

    def forward_lm(self, tokens: Tensor, *, mask: Tensor | None = None, state=None) -> LMOutput:
        self.check_tokens(tokens, mask)
        if state is not None:
            raise ValueError("routing carries no state across segments; pass state=None")
        logits, aux = self.run(tokens, input_mask=mask)
        return LMOutput(logits, aux)

    def update_kmeans(self) -> int:
        """Apply the pending k-means updates now (what the backward handle does)."""
        return self.body.update_kmeans()

    def cancel_kmeans_update(self) -> None:
        self.body.cancel_kmeans_update()

    def register_kmeans_update(self) -> KmeansUpdateHandle:
        return self.body.register_kmeans_update()

    # --- incremental decoding ---------------------------------------------------------------
    def _incremental(self) -> bool:
        c = self.config
        return c.causal and not c.moe_layers and not c.return_embeddings

    def init_state(self, batch_size: int, device: torch.device | str | None = None, **conditioning) -> State:
        """Empty branch caches per block (filled by the first ``prefill``); a decoder keeps its
        ``context`` [B, M, dim] and ``context_mask`` [B, M] in ``state.shared``."""
        self._check_context(conditioning.get("context"), "to prefill")
        self.check_conditioning(conditioning)
        if not self._incremental():
            if conditioning:
                raise ValueError("incremental decoding with a context needs causal=True and no MoE layers")
            # non-causal routing, MoE capacity (set by the call's length) and embedding outputs
            # have no incremental form: the base class re-runs the window
            return super().init_state(batch_size, device)
        return State.empty(batch_size, len(self.body.layers.blocks), **conditioning)

    def decode(self, tokens: Tensor, state: State) -> Tensor:
        if not self._incremental():
            return super().decode(tokens, state)
        if state.position == 0:
            return self._decode(tokens, state, 0)
        # the caches continue one token per row at a time
        steps = [
            self._decode(tokens[:, i : i + 1], state, state.position + i) for i in range(tokens.shape[1])
        ]
        return torch.cat(steps, dim=1)

    def _decode(self, tokens: Tensor, state: State, position: int) -> Tensor:
        n = tokens.shape[1]
        x = self._embed(tokens, position)
        projected = isinstance(self.routing_transformer, ProjectInOut)
        if projected:
            x = self.routing_transformer.project_in(x)
        kwargs = {"pos_emb": torch.arange(position, position + n, device=tokens.device)}
        if self.config.receives_context:
            # the context's routed keys are cached at the first call; later calls ignore it
            kwargs.update((k, v) for k, v in state.shared.items() if v is not None)
        x = self.body.layers.forward_cached(x, state.layers, **kwargs)
        if projected:
            x = self.routing_transformer.project_out(x)
        return self._head(x)
