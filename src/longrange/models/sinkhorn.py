"""``sinkhorn``: Sparse Sinkhorn attention (Tay et al. 2020), the sinkhorn-transformer family.

tokens -> embedding + axial positions -> depth x (Sinkhorn self-attention with optional local
heads, then a feed-forward or product-key-memory branch; with ``receives_context`` also a
context attention and feed-forward pair) in a plain or reversible residual stack -> final
norm -> logits. Each query bucket attends to its own bucket and to the key buckets a sort net
chose for it (``n_top_buckets``), or to the first ``n_sortcut`` sorted buckets (SortCut);
see :mod:`longrange.ops.sinkhorn` for the maths and :mod:`longrange.models.sinkhorn_layers`
for where this differs from the reference on purpose.

Any length runs: the model pads on the right to the bucket multiple (masked for non-causal
models; a causal model never looks right) and cuts the logits back. Causal decoding keeps
per layer all past keys / values plus the sort state of the current bucket, so a new token
costs one bucket-sized attention (plus, once per bucket, scoring the finished buckets).
The reference-named classes (``SinkhornTransformerLM``, ...) are in
:mod:`longrange.models.sinkhorn_compat` and re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.models.base import LMOutput, LongRangeLM, RecomputeState
from longrange.models.config import ModelConfig
from longrange.models.registry import register_family
from longrange.models.sinkhorn_layers import LayerCache, SinkhornSelfAttention
from longrange.modules.feedforward import Chunk, FeedForward
from longrange.modules.norms import PreNorm, ReZero
from longrange.modules.pkm import PKM
from longrange.modules.positional import AxialPositionalEmbedding
from longrange.modules.project import ProjectInOut
from longrange.modules.reversible import ReversibleSequence, SequentialSequence


@dataclass(kw_only=True)
class SinkhornConfig(ModelConfig):
    family = "sinkhorn"

    dim_head: int | None = None
    bucket_size: int = 64
    kv_bucket_size: int | None = None
    context_bucket_size: int | None = None
    causal: bool = True
    non_permutative: bool = True
    sinkhorn_iter: int = 5
    n_sortcut: int = 0
    temperature: float = 0.75
    n_top_buckets: int = 2
    use_simple_sort_net: bool = False
    n_local_attn_heads: int = 0
    reversible: bool = False
    ff_chunks: int = 1
    ff_glu: bool = False
    ff_dropout: float = 0.0
    attn_dropout: float = 0.0
    attn_layer_dropout: float = 0.0
    layer_dropout: float = 0.0
    emb_dropout: float = 0.0
    weight_tie: bool = False
    emb_dim: int | None = None
    use_rezero: bool = False
    pkm_layers: tuple[int, ...] = ()
    pkm_num_keys: int = 128
    receives_context: bool = False
    context_n_sortcut: int = 0
    return_embeddings: bool = False
    axial_shape: tuple[int, ...] | None = None
    attn_backend: Literal["auto", "naive"] = "auto"

    def validate(self) -> None:
        if self.dim_head is None:
            super().validate()
        for name in ("vocab_size", "max_seq_len", "dim", "depth", "heads", "bucket_size", "sinkhorn_iter"):
            _positive(name, getattr(self, name))
        for name in ("dim_head", "kv_bucket_size", "context_bucket_size", "emb_dim"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("n_top_buckets", "ff_chunks", "pkm_num_keys"):
            _positive(name, getattr(self, name))
        for name in ("n_sortcut", "context_n_sortcut", "n_local_attn_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("ff_dropout", "attn_dropout", "attn_layer_dropout", "layer_dropout", "emb_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.n_local_attn_heads > self.heads:
            raise ValueError(
                f"n_local_attn_heads ({self.n_local_attn_heads}) cannot exceed heads ({self.heads})"
            )
        if self.causal and self.n_sortcut > 0:
            raise ValueError("n_sortcut (SortCut) can only be used with causal=False")
        if self.causal and self.kv_bucket_size not in (None, self.bucket_size):
            raise ValueError("kv_bucket_size must equal bucket_size (or be None) when causal")
        if (
            self.use_simple_sort_net
            and not self.causal
            and self.kv_bucket_size not in (None, self.bucket_size)
        ):
            raise ValueError("use_simple_sort_net needs kv_bucket_size == bucket_size")
        bad = [layer for layer in self.pkm_layers if not 1 <= layer <= self.depth]
        if bad:
            raise ValueError(f"pkm_layers must be layer numbers in 1..depth={self.depth}, got {bad}")
        if self.attn_backend not in ("auto", "naive"):
            raise ValueError(f"attn_backend must be 'auto' or 'naive', got {self.attn_backend!r}")
        if self.axial_shape is not None and math.prod(self.axial_shape) < self.max_seq_len:
            raise ValueError(f"axial_shape {self.axial_shape} must cover max_seq_len={self.max_seq_len}")

    @property
    def pad_multiple(self) -> int:
        return math.lcm(self.bucket_size, self.kv_bucket_size or self.bucket_size)

    def positions_shape(self) -> tuple[int, ...]:
        if self.axial_shape is not None:
            return tuple(self.axial_shape)
        return (-(-self.max_seq_len // self.bucket_size), self.bucket_size)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def sinkhorn_tiny() -> SinkhornConfig:
    return SinkhornConfig(dim=64, depth=2, heads=4, bucket_size=32, max_seq_len=256, n_local_attn_heads=2)


def sinkhorn_small() -> SinkhornConfig:
    return SinkhornConfig(dim=256, depth=4, heads=4, bucket_size=64, max_seq_len=512, n_local_attn_heads=2)


def sinkhorn_bench() -> SinkhornConfig:
    """The shared benchmark size: dim 256, depth 4, heads 4; bucket 128, causal."""
    return SinkhornConfig(dim=256, depth=4, heads=4, bucket_size=128, max_seq_len=65536)


def axial_rows(emb: AxialPositionalEmbedding, offset: int, n: int) -> Tensor:
    """Positions offset .. offset + n of an axial embedding, [1, n, D], computed from the
    per-axis rows instead of the whole [max_seq_len, D] table (which the benchmark size,
    max_seq_len 65536, would build and differentiate on every call)."""
    if offset + n > emb.max_seq_len:
        raise ValueError(f"positions up to {offset + n} exceed the axial shape's {emb.max_seq_len}")
    device = emb.weights[0].device
    pos = torch.arange(offset, offset + n, device=device)
    stride = emb.max_seq_len
    parts = []
    for size, weight in zip(emb.axial_shape, emb.weights):
        stride //= size
        parts.append(F.embedding((pos // stride) % size, weight.reshape(size, weight.shape[-1])))
    out = torch.stack(parts).sum(dim=0) if emb.summed else torch.cat(parts, dim=-1)
    return out[None]


def _cached(make):
    made: list[nn.Module] = []

    def get() -> nn.Module:
        if not made:
            made.append(make())
        return made[0]

    return get


class SinkhornBody(nn.Module):
    """The residual stack: x [B, N, dim] -> [B, N, dim] (``forward`` also takes input_mask,
    context, context_mask). A reversible stack returns the sum of its two streams, as the
    reference does."""

    def __init__(self, config: SinkhornConfig, *, max_seq_len: int | None = None) -> None:
        super().__init__()
        c = config
        self.config = c
        seq = c.max_seq_len if max_seq_len is None else max_seq_len
        common = dict(
            heads=c.heads, dim_head=c.dim_head, non_permutative=c.non_permutative,
            sinkhorn_iter=c.sinkhorn_iter, temperature=c.temperature, attn_dropout=c.attn_dropout,
            dropout=c.attn_layer_dropout, n_top_buckets=c.n_top_buckets, backend=c.attn_backend,
        )  # fmt: skip

        def attn() -> nn.Module:
            return SinkhornSelfAttention(
                c.dim, c.bucket_size, seq, causal=c.causal, kv_bucket_size=c.kv_bucket_size,
                n_sortcut=c.n_sortcut, use_simple_sort_net=c.use_simple_sort_net,
                n_local_attn_heads=c.n_local_attn_heads, **common,
            )  # fmt: skip

        def context_attn() -> nn.Module:
            return SinkhornSelfAttention(
                c.dim, c.bucket_size, seq, context_only=True, kv_bucket_size=c.context_bucket_size,
                n_sortcut=c.context_n_sortcut, causal_queries=c.causal, **common,
            )  # fmt: skip

        def ff() -> nn.Module:
            return Chunk(c.ff_chunks, FeedForward(c.dim, dropout=c.ff_dropout, glu=c.ff_glu), along_dim=1)

        def context_ff() -> nn.Module:
            return FeedForward(c.dim, dropout=c.ff_dropout, glu=c.ff_glu)

        if c.weight_tie:
            attn, context_attn, ff, context_ff = map(_cached, (attn, context_attn, ff, context_ff))

        def wrap(fn: nn.Module) -> nn.Module:
            return ReZero(fn) if c.use_rezero else PreNorm(c.dim, fn, norm=nn.LayerNorm)

        blocks, self.context_blocks = [], []
        for layer in range(1, c.depth + 1):
            second = PKM(c.dim, num_keys=c.pkm_num_keys, dim_head=128) if layer in c.pkm_layers else ff()
            blocks.append((wrap(attn()), wrap(second)))
            self.context_blocks.append(False)
            if c.receives_context:
                blocks.append((wrap(context_attn()), wrap(context_ff())))
                self.context_blocks.append(True)
        to_attn = [(True, False)] * len(blocks)
        to_context = [(ctx, False) for ctx in self.context_blocks]
        routes: dict[str, Any] = {"input_mask": to_attn}
        if c.receives_context:
            routes.update(context=to_context, context_mask=to_context)
        stack = ReversibleSequence if c.reversible else SequentialSequence
        self.layers = stack(blocks, layer_dropout=c.layer_dropout, args_route=routes)

    def forward(self, x: Tensor, input_mask=None, context=None, context_mask=None, *, mask=None) -> Tensor:
        input_mask = mask if input_mask is None else input_mask
        if context is None and context_mask is not None:
            raise ValueError("context_mask was given without context")
        if context is not None and not self.config.receives_context:
            raise ValueError("context was given to a model built without receives_context=True")
        if self.config.receives_context and context is None:
            raise ValueError("this model was built with receives_context=True: pass context")
        kwargs = {k: t for k, t in (("input_mask", input_mask), ("context", context)) if t is not None}
        if context_mask is not None:
            kwargs["context_mask"] = context_mask
        out, _ = self.layers(x, **kwargs)
        return out * 2 if self.config.reversible else out

    def run_cached(self, x: Tensor, caches: list[LayerCache], *, length: int | None = None, **ctx) -> Tensor:
        """The same stack, block by block, filling (prefill) or extending (step) ``caches``."""
        reversible = self.config.reversible
        x1 = x2 = x
        for block, cache, is_ctx in zip(self.layers.blocks, caches, self.context_blocks):
            kw: dict[str, Any] = {"cache": cache}
            if cache.length == 0:
                kw["length"] = length
                if is_ctx:
                    kw.update(ctx)
            if reversible:
                x1 = x1 + block.f(x2, **kw)
                x2 = x2 + block.g(x1)
            else:
                x1 = x1 + block.f(x1, **kw)
                x1 = x1 + block.g(x1)
        return x1 + x2 if reversible else x1

    def new_caches(self, batch: int, capacity: int, like: Tensor) -> list[LayerCache]:
        return [block.f.fn.new_cache(batch, capacity, like) for block in self.layers.blocks]


@dataclass
class SinkhornState:
    """Decoding state: one cache per block and the number of positions seen."""

    caches: list[LayerCache]
    length: int


class SinkhornLM(LongRangeLM):
    """Sinkhorn language model: tokens [B, N] -> logits [B, N, V] (embeddings [B, N, dim] with
    ``return_embeddings``). ``forward_lm`` takes a padding mask; ``prefill``/``step`` decode
    causally with bucket caches."""

    config_class = SinkhornConfig

    def __init__(self, config: SinkhornConfig) -> None:
        super().__init__(config)
        c = config
        emb_dim = c.emb_dim or c.dim
        self.to_token_emb = nn.Embedding(c.vocab_size, emb_dim)
        self.axial_pos_emb = AxialPositionalEmbedding(emb_dim, c.positions_shape())
        self.emb_dropout = nn.Dropout(c.emb_dropout)
        body = SinkhornBody(c)
        self.sinkhorn_transformer: nn.Module = body
        out_dim = emb_dim
        if emb_dim != c.dim:
            self.sinkhorn_transformer = ProjectInOut(
                body, emb_dim, c.dim, project_out=not c.return_embeddings
            )
            out_dim = c.dim if c.return_embeddings else emb_dim
        self.norm = nn.LayerNorm(out_dim)
        self.to_logits = nn.Identity() if c.return_embeddings else nn.Linear(emb_dim, c.vocab_size)
        self.pad_multiple = c.pad_multiple
        self.context_pad_multiple = c.context_bucket_size or c.bucket_size
        self.max_seq_len = c.max_seq_len

    @property
    def body(self) -> SinkhornBody:
        t = self.sinkhorn_transformer
        return t.fn if isinstance(t, ProjectInOut) else t

    def _embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        x = self.to_token_emb(tokens)
        return self.emb_dropout(x + axial_rows(self.axial_pos_emb, offset, tokens.shape[1]).to(x.dtype))

    def _head(self, x: Tensor) -> Tensor:
        return self.to_logits(self.norm(x))

    def _padded_length(self, n: int) -> int:
        c = self.config
        if c.use_simple_sort_net and not c.causal:
            return c.max_seq_len
        return -(-n // self.pad_multiple) * self.pad_multiple

    def run(
        self,
        tokens: Tensor,
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """tokens [B, N] (any N <= max_seq_len) -> logits [B, N, V]; padding handled here."""
        n = tokens.shape[1]
        pad = self._padded_length(n) - n
        if pad:
            tokens = F.pad(tokens, (0, pad))
            if input_mask is not None or not self.config.causal:
                if input_mask is None:
                    input_mask = torch.ones(tokens.shape[0], n, dtype=torch.bool, device=tokens.device)
                input_mask = F.pad(input_mask, (0, pad), value=False)
        context, context_mask = self._pad_context(context, context_mask)
        x = self.sinkhorn_transformer(
            self._embed(tokens), input_mask=input_mask, context=context, context_mask=context_mask
        )
        return self._head(x)[:, :n]

    def _pad_context(self, context: Tensor | None, context_mask: Tensor | None):
        if context is None:
            return None, context_mask
        m = context.shape[1]
        pad = (-m) % self.context_pad_multiple
        if pad:
            if context_mask is None:
                context_mask = torch.ones(context.shape[0], m, dtype=torch.bool, device=context.device)
            context = F.pad(context, (0, 0, 0, pad))
            context_mask = F.pad(context_mask, (0, pad), value=False)
        return context, context_mask

    def forward_lm(self, tokens: Tensor, *, mask: Tensor | None = None, state: Any = None) -> LMOutput:
        self.check_tokens(tokens, mask)
        if state is not None:
            raise ValueError("sinkhorn carries no state across segments; pass state=None")
        return LMOutput(self.run(tokens, input_mask=mask))

    # --- incremental decoding ---------------------------------------------------------------
    def _run_cached(self, x: Tensor, caches: list[LayerCache], **kw) -> Tensor:
        t = self.sinkhorn_transformer
        if isinstance(t, ProjectInOut):
            return t.project_out(self.body.run_cached(t.project_in(x), caches, **kw))
        return self.body.run_cached(x, caches, **kw)

    def prefill(
        self,
        tokens: Tensor,
        state: SinkhornState | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> tuple[Tensor, SinkhornState]:
        """Run a prompt [B, N] (and the decoder's ``context``); return logits [B, N, V] and
        the caches to continue with :meth:`step`."""
        if not self.config.causal:
            if context is not None:
                raise ValueError("decoding with context needs causal=True")
            return super().prefill(tokens, state)  # a non-causal model re-runs the window
        if state is not None:
            raise ValueError("SinkhornLM.prefill starts a new state; pass state=None")
        self.check_tokens(tokens)
        if (context is not None) != self.config.receives_context:
            raise ValueError("context must be given exactly when the model has receives_context=True")
        n = tokens.shape[1]
        padded = F.pad(tokens, (0, self._padded_length(n) - n))
        capacity = self._padded_length(self.config.max_seq_len)
        caches = self.body.new_caches(tokens.shape[0], capacity, self.to_token_emb.weight)
        ctx = {}
        if context is not None:
            context, context_mask = self._pad_context(context, context_mask)
            ctx = {"context": context, "context_mask": context_mask}
        x = self._run_cached(self._embed(padded), caches, length=n, **ctx)
        return self._head(x)[:, :n], SinkhornState(caches, n)

    def step(self, token: Tensor, state: SinkhornState) -> tuple[Tensor, SinkhornState]:
        """One token per row [B] -> next-token logits [B, V]."""
        if isinstance(state, RecomputeState):
            return super().step(token, state)
        if state.length >= self.config.max_seq_len:
            raise ValueError(f"the decoding cache is full (max_seq_len={self.config.max_seq_len})")
        x = self._run_cached(self._embed(token[:, None], offset=state.length), state.caches)
        state.length += 1
        return self._head(x)[:, -1], state

    def context_limit(self) -> int | None:
        return self.config.max_seq_len


register_family(
    "sinkhorn",
    SinkhornConfig,
    SinkhornLM,
    {"tiny": sinkhorn_tiny, "small": sinkhorn_small, "bench": sinkhorn_bench},
    description="Sparse Sinkhorn attention: learned bucket sorting, SortCut, causal sorting",
)

from longrange.models.sinkhorn_compat import (  # noqa: E402
    Autopadder,
    AutoregressiveWrapper,
    SinkhornTransformer,
    SinkhornTransformerEncDec,
    SinkhornTransformerLM,
)

__all__ = [
    "Autopadder",
    "AutoregressiveWrapper",
    "SinkhornBody",
    "SinkhornConfig",
    "SinkhornLM",
    "SinkhornSelfAttention",
    "SinkhornState",
    "SinkhornTransformer",
    "SinkhornTransformerEncDec",
    "SinkhornTransformerLM",
    "sinkhorn_bench",
    "sinkhorn_small",
    "sinkhorn_tiny",
]
