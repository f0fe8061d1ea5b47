"""``routing``: the Routing Transformer (Roy, Saffar, Vaswani, Grangier 2021, TACL).

Content-based sparse attention: online spherical k-means routes queries and keys into clusters
and attention runs inside each cluster, O(n^1.5) when there are sqrt(n) clusters of sqrt(n)
tokens; local heads beside the routed ones see a sliding window. The layout and keywords are
those of the ``routing_transformer`` package (1.6.1); the compatibility classes
(``RoutingTransformerLM`` ...) live in :mod:`longrange.models.routing_compat`.

Notable choices (SPEC.md lists the reference defects fixed here):
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
- decoding keeps per-layer caches (local keys of the last windows, per-cluster ring buffers of
  routed keys), so a new token costs O(window) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from longrange.convert import register_converter
from longrange.models.base import LMOutput, LongRangeLM, RecomputeState
from longrange.models.config import ModelConfig
from longrange.models.registry import register_family
from longrange.models.routing_layers import (
    AttentionCache,
    KmeansAttention,
    KmeansUpdateHandle,
    SelfAttention,
    update_kmeans,
)
from longrange.modules.feedforward import Chunk, FeedForward
from longrange.modules.moe import MoE
from longrange.modules.norms import ScaleNorm
from longrange.modules.pkm import PKM
from longrange.modules.positional import AbsolutePositionalEmbedding
from longrange.modules.project import ProjectInOut
from longrange.modules.reversible import ReversibleSequence, SequentialSequence
from longrange.modules.shift import shift_tokens

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


@dataclass(kw_only=True)
class RoutingConfig(ModelConfig):
    family = "routing"

    dim_head: int | None = None
    window_size: int = 64
    local_attn_window_size: int | None = None
    local_attn_radius_blocks: int = 1
    n_local_attn_heads: int | tuple[int, ...] = 0
    causal: bool = True
    emb_dim: int | None = None
    weight_tie: bool = False
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    attn_layer_dropout: float = 0.0
    layer_dropout: float = 0.0
    ff_mult: int = 4
    ff_activation: str | None = None
    ff_glu: bool = False
    ff_chunks: int = 1
    reversible: bool = False
    kmeans_ema_decay: float = 0.999
    commitment_factor: float = 1e-4
    kmeans_update_on_backward: bool = True
    receives_context: bool = False
    context_window_size: int | None = None
    rel_pos_emb: bool = True
    pkm_layers: tuple[int, ...] = ()
    pkm_num_keys: int = 128
    moe_layers: tuple[int, ...] = ()
    moe_num_experts: int = 4
    moe_loss_coef: float = 1e-2
    num_mem_kv: int = 0
    shared_qk: bool | None = None
    context_shared_qk: bool = False
    use_rezero: bool = False
    use_scale_norm: bool = False
    tie_embedding: bool = False
    use_absolute_pos_emb: bool = False
    shift_tokens: bool = False
    return_embeddings: bool = False
    # Recompute the causal routed attention in backward instead of keeping its blocked spans:
    # about a fifth less activation memory for about a tenth more time.
    checkpoint_routed_attention: bool = False

    def local_heads(self) -> tuple[int, ...]:
        """Local attention heads of every layer."""
        n = self.n_local_attn_heads
        return tuple(n) if isinstance(n, tuple) else (n,) * self.depth

    def validate(self) -> None:
        super().validate()
        positive = ["window_size", "local_attn_window_size", "context_window_size", "dim_head", "emb_dim"]
        for name in [*positive, "ff_mult", "ff_chunks", "pkm_num_keys", "moe_num_experts"]:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("local_attn_radius_blocks", "num_mem_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_seq_len % self.window_size:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be divisible by window_size "
                f"({self.window_size}): it sets the number of clusters"
            )
        local = self.n_local_attn_heads
        if isinstance(local, list):
            local = self.n_local_attn_heads = tuple(local)
        if isinstance(local, tuple) and len(local) != self.depth:
            raise ValueError(f"n_local_attn_heads has {len(local)} entries for depth {self.depth}")
        for n in self.local_heads():
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.heads:
                raise ValueError(f"n_local_attn_heads must be ints in [0, heads={self.heads}], got {local!r}")
        if self.weight_tie and len(set(self.local_heads())) > 1:
            raise ValueError("weight_tie needs the same n_local_attn_heads in every layer")
        for name in ("attn_dropout", "ff_dropout", "attn_layer_dropout", "layer_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.kmeans_ema_decay <= 1.0:
            raise ValueError(f"kmeans_ema_decay must lie in [0, 1], got {self.kmeans_ema_decay!r}")
        if self.commitment_factor < 0 or self.moe_loss_coef < 0:
            raise ValueError("commitment_factor and moe_loss_coef must be >= 0")
        if self.ff_activation is not None and self.ff_activation not in ACTIVATIONS:
            raise ValueError(
                f"ff_activation must be None or one of {sorted(ACTIVATIONS)}, got {self.ff_activation!r}"
            )
        for name in ("pkm_layers", "moe_layers"):
            layers = getattr(self, name)
            if isinstance(layers, int):
                layers = (layers,)
            layers = tuple(layers)
            object.__setattr__(self, name, layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= self.depth for i in layers):
                raise ValueError(f"{name} must name layers in 1..depth={self.depth}, got {layers!r}")
        if self.moe_num_experts < 2:
            raise ValueError(f"moe_num_experts must be >= 2, got {self.moe_num_experts}")
        if (self.dim_head or self.dim // self.heads) % 2:
            raise ValueError("the head width (dim_head or dim // heads) must be even for rotary positions")

    @property
    def num_clusters(self) -> int:
        return self.max_seq_len // self.window_size


def routing_tiny() -> RoutingConfig:
    return RoutingConfig(dim=64, depth=2, heads=4, n_local_attn_heads=2, window_size=32, max_seq_len=256)


def routing_small() -> RoutingConfig:
    return RoutingConfig(dim=256, depth=4, heads=4, n_local_attn_heads=2, window_size=64, max_seq_len=512)


def routing_bench() -> RoutingConfig:
    """The shared benchmark size (dim 256, depth 4, heads 4) with 2 local heads and window 128;
    the benchmark raises max_seq_len to the measured length (so clusters = length / 128)."""
    return RoutingConfig(dim=256, depth=4, heads=4, n_local_attn_heads=2, window_size=128, max_seq_len=1024)


class Branch(nn.Module):
    """One residual branch: pre-norm (LayerNorm or ScaleNorm) or a ReZero gate, then an
    optional token shift that honours the padding mask, then ``fn``."""

    def __init__(
        self, dim: int, fn: nn.Module, *, norm: str | None, shifts: tuple[int, ...] | None, attn: bool
    ):
        super().__init__()
        self.norm = None if norm is None else (ScaleNorm(dim) if norm == "scale" else nn.LayerNorm(dim))
        self.residual_weight = nn.Parameter(torch.zeros(1)) if norm is None else None
        self.fn = fn
        self.shifts = shifts
        self.attn = attn

    def forward(self, x: Tensor, *, input_mask: Tensor | None = None, cache: dict | None = None, **kwargs):
        h = x if self.norm is None else self.norm(x)
        if self.shifts:
            past = None if cache is None else cache.get("shift")
            shifted = shift_tokens(h, self.shifts, input_mask, past=past)
            if cache is not None:
                keep = max(self.shifts)
                cache["shift"] = (h if past is None else torch.cat((past, h), dim=1))[:, -keep:]
            h = shifted
        if self.attn:
            attn_cache = None if cache is None else cache.setdefault("attn", AttentionCache())
            out = self.fn(h, input_mask=input_mask, cache=attn_cache, **kwargs)
        else:
            out = self.fn(h, input_mask=input_mask, mask=input_mask)
        if self.residual_weight is None:
            return out
        if isinstance(out, tuple):
            return (out[0] * self.residual_weight, *out[1:])
        return out * self.residual_weight


class RoutingBody(nn.Module):
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
            inner = FeedForward(
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
            "pkm": lambda: PKM(c.dim, num_keys=c.pkm_num_keys),
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

        blocks, self_attn_blocks = [], []
        for i, local in enumerate(c.local_heads()):
            layer = i + 1
            kind = "moe" if layer in c.moe_layers else ("pkm" if layer in c.pkm_layers else "ff")
            self_attn_blocks.append(len(blocks))
            blocks.append(
                (
                    Branch(c.dim, make("attn", local), norm=norm, shifts=shifts, attn=True),
                    Branch(c.dim, make(kind), norm=norm, shifts=shifts, attn=False),
                )
            )
            if c.receives_context:
                blocks.append(
                    (
                        Branch(c.dim, make("context_attn"), norm=norm, shifts=shifts, attn=True),
                        Branch(c.dim, make("context_ff"), norm=norm, shifts=shifts, attn=False),
                    )
                )
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
        self._handle: KmeansUpdateHandle | None = None
        if c.kmeans_update_on_backward:
            self.register_kmeans_update()

    def forward(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.layers(x, **kwargs)

    @torch.no_grad()
    def forward_cached(
        self,
        x: Tensor,
        caches: list[tuple[dict, dict]],
        pos_emb: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Decoding pass (eval): the same maths as :meth:`forward`, with a cache per branch.
        The context is needed at the first call only (its routed keys are cached)."""
        f_kwargs = []
        for i in range(len(caches)):
            if i in self.self_attn_blocks:
                f_kwargs.append({"pos_emb": pos_emb})
            else:
                f_kwargs.append({"context": context, "context_mask": context_mask})
        if self.config.reversible:
            x1 = x2 = x
            for block, (cf, cg), kw in zip(self.layers.blocks, caches, f_kwargs):
                x1 = x1 + block.f(x2, cache=cf, **kw)[0]
                x2 = x2 + _first(block.g(x1, cache=cg))
            return (x1 + x2) / 2
        for block, (cf, cg), kw in zip(self.layers.blocks, caches, f_kwargs):
            x = x + block.f(x, cache=cf, **kw)[0]
            x = x + _first(block.g(x, cache=cg))
        return x

    def register_kmeans_update(self) -> KmeansUpdateHandle:
        """Update the k-means after every backward pass (replacing an earlier handle)."""
        self.cancel_kmeans_update()
        self._handle = KmeansUpdateHandle(self)
        return self._handle

    def cancel_kmeans_update(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def update_kmeans(self) -> int:
        return update_kmeans(self)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@dataclass
class RoutingState:
    """Decoding state: tokens seen so far and a cache per (block, branch)."""

    position: int
    caches: list[tuple[dict, dict]] = field(default_factory=list)


class RoutingLM(LongRangeLM):
    """Routing Transformer language model: tokens [B, N] -> logits [B, N, V] (+ aux loss)."""

    config_class = RoutingConfig

    def __init__(
        self, config: RoutingConfig, *, activation: type[nn.Module] | nn.Module | None = None
    ) -> None:
        super().__init__(config)
        c = config
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

    def run(
        self,
        tokens: Tensor,
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """tokens [B, N] -> (logits [B, N, V] or embeddings, aux loss)."""
        if self.config.receives_context and context is None:
            raise ValueError("this model has receives_context=True: pass context [B, M, dim]")
        if context is not None and not self.config.receives_context:
            raise ValueError("context was given but the model has receives_context=False")
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
        return update_kmeans(self)

    def cancel_kmeans_update(self) -> None:
        self.body.cancel_kmeans_update()

    def register_kmeans_update(self) -> KmeansUpdateHandle:
        return self.body.register_kmeans_update()

    # --- incremental decoding ---------------------------------------------------------------
    def _incremental(self) -> bool:
        c = self.config
        return c.causal and not c.moe_layers and not c.return_embeddings

    def prefill(
        self,
        tokens: Tensor,
        state: Any = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, Any]:
        """Run a prompt [B, N] and return its logits and the decoding state. A model with
        ``receives_context`` takes the ``context`` [B, M, dim] (and ``context_mask``) here."""
        if self.config.receives_context and context is None:
            raise ValueError("this model has receives_context=True: pass context to prefill")
        if context is not None and not self.config.receives_context:
            raise ValueError("context was given but the model has receives_context=False")
        if not self._incremental():
            if context is not None:
                raise ValueError("incremental decoding with a context needs causal=True and no MoE layers")
            # MoE capacity depends on the length of the call: recompute to stay exact.
            return super().prefill(tokens, state)
        if state is not None:
            raise ValueError("RoutingLM.prefill starts from state=None")
        self.check_tokens(tokens)
        caches = [({}, {}) for _ in self.body.layers.blocks]
        state = RoutingState(0, caches)
        return self._decode(tokens, state, context, context_mask), state

    def step(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        if isinstance(state, RecomputeState):
            return super().step(token, state)
        if state.position >= self.config.max_seq_len:
            raise ValueError(f"the decoding window is full (max_seq_len={self.config.max_seq_len})")
        return self._decode(token[:, None], state)[:, -1], state

    @torch.no_grad()
    def _decode(
        self,
        tokens: Tensor,
        state: RoutingState,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        n = tokens.shape[1]
        x = self._embed(tokens, state.position)
        projected = isinstance(self.routing_transformer, ProjectInOut)
        if projected:
            x = self.routing_transformer.project_in(x)
        positions = torch.arange(state.position, state.position + n, device=tokens.device)
        x = self.body.forward_cached(x, state.caches, positions, context, context_mask)
        if projected:
            x = self.routing_transformer.project_out(x)
        state.position += n
        return self._head(x)


# --- weights of the reference package ----------------------------------------------------


def convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a ``routing_transformer`` model's state dict (LM, block stack or enc-dec) into
    ``model``, k-means centroids included; see :mod:`longrange.models.routing_compat`."""
    from longrange.models.routing_compat import load_reference_weights

    load_reference_weights(model, reference)


register_converter(RoutingLM, convert_reference)
register_converter(RoutingBody, convert_reference)

register_family(
    "routing",
    RoutingConfig,
    RoutingLM,
    {"tiny": routing_tiny, "small": routing_small, "bench": routing_bench},
    description="Routing Transformer: k-means routed attention (strictly causal) + local heads",
)

_COMPAT_NAMES = (
    "Autopadder",
    "AutoregressiveWrapper",
    "RoutingTransformer",
    "RoutingTransformerEncDec",
    "RoutingTransformerLM",
)


def __getattr__(name: str):
    # the reference-named classes subclass the ones above, so they load on first use
    if name in _COMPAT_NAMES:
        from longrange.models import routing_compat

        return getattr(routing_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KmeansAttention",
    "RoutingBody",
    "RoutingConfig",
    "RoutingLM",
    "SelfAttention",
    "convert_reference",
    "routing_bench",
    "routing_small",
    "routing_tiny",
    *_COMPAT_NAMES,
]
