"""``sinkhorn``: Sparse Sinkhorn attention (Tay et al. 2020), the sinkhorn-transformer family.

tokens -> embedding + axial positions -> depth x (Sinkhorn self-attention with optional local
heads, then a feed-forward or product-key-memory branch; with ``receives_context`` also a
context attention and feed-forward pair) in a plain or reversible residual stack -> final
norm -> logits. Each query bucket attends to its own bucket and to the key buckets a sort net
chose for it (``n_top_buckets``), or to the first ``n_sortcut`` sorted buckets (SortCut);
see :mod:`longrange.ops.sinkhorn` for the maths and the layer modules of this package for
where this differs from the reference on purpose.

Any length runs: the model pads on the right to the bucket multiple (masked for non-causal
models; a causal model never looks right) and cuts the logits back. A reversible stack
returns the sum of its two streams, as the reference does (twice the shared stack's mean).
Causal decoding keeps per layer all past keys / values plus the sort state of the current
bucket in ``state.layers[i]["attn"]`` (docs/ARCHITECTURE.md, "State"), so a new token costs
one bucket-sized attention (plus, once per bucket, scoring the finished buckets); a
decoder's padded ``context`` sits in ``state.shared``. The reference-named classes
(``SinkhornTransformerLM``, ...) are in :mod:`longrange.models.sinkhorn.compat`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.sinkhorn.config import SinkhornConfig
from longrange.models.sinkhorn.layers import SinkhornSelfAttention
from longrange.models.state import State
from longrange.modules.branch import Branch
from longrange.modules.chunked_feedforward import ChunkedFeedForward
from longrange.modules.feedforward import Chunk
from longrange.modules.pkm import PKM
from longrange.modules.positional import AxialPositionalEmbedding
from longrange.modules.project import ProjectInOut
from longrange.modules.reversible import ReversibleSequence, SequentialSequence

CONTEXT_KEYS = ("context", "context_mask")
# Under recompute_attention="auto", the last block's attention branch keeps its activations:
# its backward runs first and frees them before any other branch runs again, so the peak does
# not grow (bench preset, 64K tokens, the bench's live peak: 1,639 -> 1,645 MB; two blocks
# kept: 2,043 MB) and its forward runs once: steps in turn, 1.037x at 64K (8 rounds), 1.02x at
# 32K. Routing gains 1.046x from the same (twice 6 rounds), but its 64K peak goes 1,691 ->
# 1,848 MB (1,948 MB in the bench's memory pass), too near the 2 GB it is held to: it
# recomputes every branch.
KEEP_LAST_ATTENTION = 1


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
    # summed: one add per axis, not a stacked copy of every part and its sum
    out = functools.reduce(torch.add, parts) if emb.summed else torch.cat(parts, dim=-1)
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
            return Chunk(
                c.ff_chunks, ChunkedFeedForward(c.dim, dropout=c.ff_dropout, glu=c.ff_glu), along_dim=1
            )

        def context_ff() -> nn.Module:
            return ChunkedFeedForward(c.dim, dropout=c.ff_dropout, glu=c.ff_glu)

        if c.weight_tie:
            attn, context_attn, ff, context_ff = map(_cached, (attn, context_attn, ff, context_ff))

        def wrap(fn: nn.Module) -> nn.Module:
            return Branch(c.dim, fn, norm="rezero" if c.use_rezero else "layer", mask_key="input_mask")

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
        # ``length``: how many positions of a padded first decoding call are real
        routes: dict[str, Any] = {"input_mask": to_attn, "length": to_attn}
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

    def forward_cached(self, x: Tensor, layers: list[dict], **kwargs) -> Tensor:
        """Decoding: :meth:`forward` on new positions, continuing from ``layers`` (the
        stack's cached walk; the same sum of streams when reversible)."""
        out = self.layers.forward_cached(x, layers, **kwargs)
        return out * 2 if self.config.reversible else out

    def new_caches(self, batch: int, capacity: int, like: Tensor) -> list[dict]:
        """One empty attention cache per block for up to ``capacity`` positions."""
        return [block.f.fn.new_cache(batch, capacity, like) for block in self.layers.blocks]


class SinkhornLM(LongRangeLM):
    """Sinkhorn language model: tokens [B, N] -> logits [B, N, V] (embeddings [B, N, dim] with
    ``return_embeddings``). ``forward_lm`` takes a padding mask; a causal model decodes
    incrementally with bucket caches, a bidirectional one re-runs its window."""

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
    def conditioning_keys(self) -> tuple[str, ...]:
        """A causal decoder with ``receives_context`` takes the context when a state is made;
        otherwise no conditioning (a bidirectional model re-runs its window to decode)."""
        return CONTEXT_KEYS if self.config.receives_context and self.config.causal else ()

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
        on = self.training and self.config.recompute_for(tokens.numel())
        auto = self.config.recompute_attention == "auto"
        self.body.layers.set_f_recompute(on, keep_last=KEEP_LAST_ATTENTION if auto else 0)
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
    def init_state(self, batch_size: int, device: torch.device | str | None = None, **conditioning) -> State:
        """Empty bucket caches for ``max_seq_len`` positions per block; a decoder's context
        (padded to its bucket multiple) and mask in ``state.shared``."""
        if not self.config.causal:
            if conditioning.get("context") is not None:
                raise ValueError("decoding with context needs causal=True")
            return super().init_state(batch_size, device, **conditioning)
        self.check_conditioning(conditioning)
        context, context_mask = conditioning.get("context"), conditioning.get("context_mask")
        if (context is not None) != self.config.receives_context:
            raise ValueError("context must be given exactly when the model has receives_context=True")
        weight = self.to_token_emb.weight
        like = weight if device is None else weight.new_empty(0, device=device)
        capacity = self._padded_length(self.config.max_seq_len)
        caches = self.body.new_caches(batch_size, capacity, like)
        shared = {}
        if context is not None:
            context, context_mask = self._pad_context(context, context_mask)
            shared = {k: v for k, v in zip(CONTEXT_KEYS, (context, context_mask)) if v is not None}
        return State(batch_size, [{"attn": cache} for cache in caches], 0, shared)

    def decode(self, tokens: Tensor, state: State) -> Tensor:
        if not self.config.causal:
            return super().decode(tokens, state)
        n = tokens.shape[1]
        if state.position == 0:
            # one pass over the prompt padded to the bucket multiple fills every cache
            padded = F.pad(tokens, (0, self._padded_length(n) - n))
            x = self._run_cached(self._embed(padded), state.layers, length=n, **state.shared)
            return self._head(x)[:, :n]
        rows = []
        for t in range(n):
            x = self._run_cached(self._embed(tokens[:, t : t + 1], state.position + t), state.layers)
            rows.append(self._head(x))
        return torch.cat(rows, dim=1)

    def _run_cached(self, x: Tensor, layers: list[dict], **kwargs) -> Tensor:
        t = self.sinkhorn_transformer
        if isinstance(t, ProjectInOut):
            return t.project_out(self.body.forward_cached(t.project_in(x), layers, **kwargs))
        return self.body.forward_cached(x, layers, **kwargs)
