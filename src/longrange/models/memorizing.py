"""``memorizing``: the Memorizing Transformer (Wu, Rabe, Hutchins, Szegedy, ICLR 2022).

A pre-norm decoder read chunk by chunk (``max_seq_len`` tokens per chunk). Every layer attends
causally within the chunk, with one shared key/value head and a T5 relative position bias,
plus optional XL memories: the keys and values of the last ``xl_max_memories`` positions.
The memorizing layers also retrieve, for every query and head, the top-k (key, value) pairs
from a kNN memory of everything the layer has seen earlier in the document
(``longrange.memory.knn``), and take one softmax over retrieved and local keys (the
reference's way), or with ``knn_combine="gate"`` a softmax over each, mixed per head by a learned
sigmoid gate (the paper's way: the model can turn away from stale memories early on). Their
attention is cosine attention: unit-norm queries and keys times a learned per-head
temperature. Optionally the output passes a tanh gate (Flamingo style), and ``shift_tokens``
feeds every attention half of its input features from the previous position (a cheap aid to
copying: content-based lookups form much sooner). ``xl_reproject`` keeps the XL window as
layer inputs projected with the current weights each chunk (Transformer-XL) rather than as the
keys/values of the step that made them.

Order of a chunk: search the memory with the chunk's queries, attend, and only when the
chunk is done add its keys and values to the memory (entries that leave the XL window, when
the layer has one), so a chunk never retrieves itself and the memory only ever holds the past.
The memory is per batch row: the trainer resets the rows that start a new document; tokens
``clear_memories_on_sos_token_id`` / ``..._eos_...`` mark document starts inside a chunk: the
queries from that point on retrieve nothing, and after the chunk the row's memory is cleared
and refilled with the new document's entries only (causal, unlike the reference, which
cleared the whole row before the chunk whenever the token occurred anywhere in it).

Decoding keeps the current chunk's keys and values as a cache; when it reaches
``max_seq_len`` tokens it is committed exactly as a forward commits a chunk, so generation
equals a chunked forward over the same tokens.

Reference-compatible classes (``MemorizingTransformer``, ``KNNAttention``, ``KNNMemory``,
``KNNMemoryList``) are exported from here. Dimensions: B batch, N chunk queries, P earlier
keys (XL memory + decoded part of the chunk), M = P + N keys, H heads, D head width, K
retrieved pairs per query and head.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from longrange.memory.knn import KNNMemory, KNNMemoryList
from longrange.memory.knn.store import prepare_directory
from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.config import ModelConfig
from longrange.models.memorizing_flow import MemorizingState, run_chunk
from longrange.models.memorizing_layers import Attention, KNNAttention, causal_bias, relative_bias
from longrange.models.registry import register_family
from longrange.modules.feedforward import FeedForward
from longrange.modules.positional import T5RelativePositionBias


@dataclass(kw_only=True)
class MemorizingConfig(ModelConfig):
    family = "memorizing"

    max_seq_len: int = 512  # the chunk: tokens attended locally; longer inputs run chunk by chunk
    dim_head: int | None = None  # default dim // heads
    knn_attn_heads: int | None = None  # heads of the memorizing layers (default heads)
    attn_dropout: float = 0.0
    ff_mult: int = 4
    ff_dropout: float = 0.0
    memorizing_layers: tuple[int, ...] | None = None  # 1-based; default (max(1, depth // 2),)
    max_knn_memories: int = 250000  # per memorizing layer and batch row
    num_retrieved_memories: int = 32
    clear_memories_on_sos_token_id: int | None = None
    clear_memories_on_eos_token_id: int | None = None
    knn_memories_directory: str | None = None  # parent of the memory files (None: system temp)
    shift_knn_memories_down: int = 0
    shift_xl_memories_down: int = 0
    pad_id: int = 0  # ignore_index of the reference-style loss (labels=...)
    xl_max_memories: int = 0
    xl_memory_layers: tuple[int, ...] | None = None  # 1-based; default all layers
    # XL memories keep each layer's attention input and project it with the current weights
    # every chunk (Transformer-XL), instead of keys/values projected when they were made (the
    # reference); the kNN memory then gets keys/values projected as entries leave the window
    xl_reproject: bool = False
    knn_memory_multiprocessing: bool = False
    knn_backend: Literal["auto", "exact", "faiss"] = "auto"
    knn_index: Literal["flat", "hnsw", "ivf"] = "flat"
    knn_gate_output: bool = False
    # how retrieved memories join the local keys: "softmax" (one softmax over both, as the
    # reference) or "gate" (the paper: a softmax each, mixed by a learned per-head sigmoid gate)
    knn_combine: Literal["softmax", "gate"] = "softmax"
    shift_tokens: bool = False  # half the attention input features from the previous position
    attn_scale_init: float = 20.0
    rel_pos_num_buckets: int = 32
    rel_pos_max_distance: int = 128

    def validate(self) -> None:
        super().validate()
        depth = self.depth
        for name in ("dim_head", "knn_attn_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("ff_mult", "max_knn_memories", "rel_pos_num_buckets", "rel_pos_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "num_retrieved_memories",
            "xl_max_memories",
            "shift_knn_memories_down",
            "shift_xl_memories_down",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("attn_dropout", "ff_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("memorizing_layers", "xl_memory_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if not isinstance(layers, tuple) or any(
                not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= depth for i in layers
            ):
                raise ValueError(f"{name} must be a tuple of layer numbers in [1, {depth}], got {layers!r}")
        for name in ("clear_memories_on_sos_token_id", "clear_memories_on_eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be None or a token id in [0, {self.vocab_size}), got {value}")
        if self.knn_backend not in ("auto", "exact", "faiss"):
            raise ValueError(f"knn_backend must be 'auto', 'exact' or 'faiss', got {self.knn_backend!r}")
        if self.knn_index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"knn_index must be 'flat', 'hnsw' or 'ivf', got {self.knn_index!r}")
        if self.knn_backend == "exact" and self.knn_index != "flat":
            raise ValueError(f"knn_index={self.knn_index!r} needs knn_backend='faiss' (exact search is flat)")
        if self.knn_combine not in ("softmax", "gate"):
            raise ValueError(f"knn_combine must be 'softmax' or 'gate', got {self.knn_combine!r}")
        for name in ("shift_tokens", "xl_reproject"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.attn_scale_init > 0:
            raise ValueError(f"attn_scale_init must be positive, got {self.attn_scale_init}")

    # --- derived layout -------------------------------------------------------------------
    @property
    def head_width(self) -> int:
        return self.dim_head or self.dim // self.heads

    @property
    def knn_layer_numbers(self) -> tuple[int, ...]:
        layers = self.memorizing_layers if self.memorizing_layers is not None else (max(1, self.depth // 2),)
        return tuple(dict.fromkeys(layers))

    @property
    def xl_layer_numbers(self) -> tuple[int, ...]:
        if self.xl_max_memories == 0:
            return ()
        layers = self.xl_memory_layers if self.xl_memory_layers is not None else range(1, self.depth + 1)
        return tuple(dict.fromkeys(layers))


def memorizing_tiny() -> MemorizingConfig:
    return MemorizingConfig(
        dim=64, depth=2, heads=2, max_seq_len=128, max_knn_memories=4096, num_retrieved_memories=16
    )


def memorizing_small() -> MemorizingConfig:
    return MemorizingConfig(dim=256, depth=4, heads=4, max_seq_len=256, max_knn_memories=16384)


def memorizing_bench() -> MemorizingConfig:
    """The benchmark size: dim 256, depth 4, heads 4, chunks of 512, 64K memories in an HNSW
    index (the reference's kind: its search cost barely grows as the memory fills, where an
    exact flat search grows linearly)."""
    return MemorizingConfig(
        dim=256, depth=4, heads=4, max_seq_len=512, max_knn_memories=65536, knn_index="hnsw"
    )


class MemorizingBlock(nn.Module):
    def __init__(self, config: MemorizingConfig, layer: int) -> None:
        super().__init__()
        c = config
        xl = c.xl_max_memories if layer in c.xl_layer_numbers else 0
        self.attn_norm = nn.LayerNorm(c.dim)
        if layer in c.knn_layer_numbers:
            self.attn: Attention = KNNAttention(
                dim=c.dim,
                heads=c.knn_attn_heads or c.heads,
                dim_head=c.head_width,
                dropout=c.attn_dropout,
                num_retrieved_memories=c.num_retrieved_memories,
                xl_max_memories=xl,
                attn_scale_init=c.attn_scale_init,
                gate_output=c.knn_gate_output,
                combine=c.knn_combine,
            )
        else:
            self.attn = Attention(
                dim=c.dim, heads=c.heads, dim_head=c.head_width, dropout=c.attn_dropout, xl_max_memories=xl
            )
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff = FeedForward(c.dim, mult=c.ff_mult, dropout=c.ff_dropout)


# --- the language model -------------------------------------------------------------------
class MemorizingLM(LongRangeLM):
    """Memorizing Transformer LM: ``forward_lm(tokens, mask=None, state=None)``; tokens longer
    than ``max_seq_len`` run chunk by chunk through the state (a temporary one when None)."""

    config_class = MemorizingConfig
    carries_state = True
    # ``longrange bench speed`` feeds long inputs chunk by chunk (fwd+bwd per chunk) through
    # the state, as training does, instead of one call over the whole length.
    bench_feeds_chunks = True

    def __init__(self, config: MemorizingConfig) -> None:
        super().__init__(config)
        c = config
        self.knn_layers = c.knn_layer_numbers
        self.xl_layers = c.xl_layer_numbers
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        bias_kwargs = dict(
            causal=True,
            scale=c.head_width**0.5,
            num_buckets=c.rel_pos_num_buckets,
            max_distance=c.rel_pos_max_distance,
        )
        self.rel_pos = T5RelativePositionBias(heads=c.heads, **bias_kwargs)
        self.knn_rel_pos = T5RelativePositionBias(heads=c.knn_attn_heads or c.heads, **bias_kwargs)
        self.blocks = nn.ModuleList(MemorizingBlock(c, layer) for layer in range(1, c.depth + 1))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size)
        self.apply(self._init_weights)
        for block in self.blocks:
            nn.init.normal_(block.attn.to_out.weight, std=0.02 / (2 * c.depth) ** 0.5)
            nn.init.normal_(block.ff.w2.weight, std=0.02 / (2 * c.depth) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- memories -------------------------------------------------------------------------
    def create_knn_memories(
        self, *, batch_size: int, device: torch.device | str | None = None
    ) -> KNNMemoryList:
        """One kNN memory of ``batch_size`` rows per memorizing layer, in a fresh directory
        under ``knn_memories_directory`` (or the system temp); ``cleanup`` removes it."""
        c = self.config
        if not self.knn_layers:
            return KNNMemoryList()
        parent = None if c.knn_memories_directory is None else prepare_directory(c.knn_memories_directory)
        directory = tempfile.mkdtemp(prefix="longrange-knn-", dir=parent)
        device = torch.device(device) if device is not None else self.embed.weight.device
        return KNNMemoryList.create_memories(
            batch_size=batch_size, num_memory_layers=len(self.knn_layers), memories_directory=directory
        )(
            dim=c.head_width,
            max_memories=c.max_knn_memories,
            multiprocessing=c.knn_memory_multiprocessing,
            backend=c.knn_backend,
            index=c.knn_index,
            device=device,
            remove_directory=True,
        )

    @contextmanager
    def knn_memories_context(self, **kwargs):
        """``with model.knn_memories_context(batch_size=B) as memories:`` ... files removed after."""
        memories = self.create_knn_memories(**kwargs)
        try:
            yield memories
        finally:
            memories.cleanup()

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> MemorizingState:
        return MemorizingState(batch_size, self.create_knn_memories(batch_size=batch_size, device=device))

    def detach_state(self, state: MemorizingState) -> MemorizingState:
        return state  # memories are stored detached

    def reset_state_rows(self, state: MemorizingState, rows: Tensor) -> MemorizingState:
        rows = rows.to(torch.bool)
        if rows.shape != (state.batch_size,):
            raise ValueError(f"rows must have shape ({state.batch_size},), got {tuple(rows.shape)}")
        if not bool(rows.any()):
            return state
        state.knn.clear_memory(rows.nonzero().flatten().tolist())
        if state.xl is not None:
            state.xl = [(kv, valid & ~rows.to(valid.device)[:, None]) for kv, valid in state.xl]
        if state.shift is not None:
            state.shift = [(h, keep & ~rows.to(keep.device)[:, None]) for h, keep in state.shift]
        return state

    def context_limit(self) -> int | None:
        return None

    def _check_state(self, state: MemorizingState, batch: int) -> None:
        if not isinstance(state, MemorizingState):
            raise TypeError(f"state must be a MemorizingState (from init_state), got {type(state).__name__}")
        if state.batch_size != batch or (state.knn and state.knn.num_indices != batch):
            raise ValueError(
                f"batch size {batch} does not match the kNN memories ({state.batch_size} rows); "
                f"create them with batch_size={batch}"
            )
        if len(state.knn) != len(self.knn_layers):
            raise ValueError(
                f"expected {len(self.knn_layers)} kNN memories (one per memorizing layer), "
                f"got {len(state.knn)}"
            )

    # --- forward --------------------------------------------------------------------------
    def forward_lm(
        self, tokens: Tensor, *, mask: Tensor | None = None, state: MemorizingState | None = None
    ) -> LMOutput:
        self.check_tokens(tokens, mask, allow_longer=True)
        batch, n = tokens.shape
        if state is None and n <= self.config.max_seq_len:
            return LMOutput(self._chunk(tokens, mask, None, commit=False))
        temporary = state is None
        if temporary:
            state = self.init_state(batch, tokens.device)
        self._check_state(state, batch)
        if state.cache is not None:
            raise ValueError("this state is mid-way through decoding; use step() to continue it")
        try:
            size = self.config.max_seq_len
            logits = [
                self._chunk(tokens[:, i : i + size], None if mask is None else mask[:, i : i + size], state)
                for i in range(0, n, size)
            ]
        finally:
            if temporary:
                state.close()
        return LMOutput(torch.cat(logits, dim=1), None, None if temporary else state)

    def _chunk(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        state: MemorizingState | None,
        *,
        commit: bool = True,
        add_knn_memory: bool = True,
    ) -> Tensor:
        """Run one chunk (or the next tokens of a decoded chunk); return logits [B, n, V]."""
        return run_chunk(self, tokens, mask, state, commit=commit, add_knn_memory=add_knn_memory)

    # --- decoding -------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, state: MemorizingState | None = None) -> tuple[Tensor, MemorizingState]:
        self.check_tokens(tokens, allow_longer=True)
        batch, n = tokens.shape
        if state is None:
            state = self.init_state(batch, tokens.device)
        self._check_state(state, batch)
        size, logits, start = self.config.max_seq_len, [], 0
        while start < n:
            # Pieces end at chunk boundaries, where the decoded chunk is committed.
            room = size - (state.cache.length if state.cache is not None else 0)
            piece = tokens[:, start : start + room]
            logits.append(self._chunk(piece, None, state, commit=False))
            start += piece.shape[1]
        return torch.cat(logits, dim=1), state

    def step(self, token: Tensor, state: MemorizingState) -> tuple[Tensor, MemorizingState]:
        self.check_tokens(token[:, None], allow_longer=True)
        self._check_state(state, token.shape[0])
        return self._chunk(token[:, None], None, state, commit=False)[:, -1], state


register_family(
    "memorizing",
    MemorizingConfig,
    MemorizingLM,
    {"tiny": memorizing_tiny, "small": memorizing_small, "bench": memorizing_bench},
    description="local attention + top-k retrieval from a kNN memory of past keys/values (faiss)",
)

from longrange.models.memorizing_compat import MemorizingTransformer  # noqa: E402

__all__ = [
    "Attention",
    "KNNAttention",
    "KNNMemory",
    "KNNMemoryList",
    "MemorizingConfig",
    "MemorizingLM",
    "MemorizingState",
    "MemorizingTransformer",
    "causal_bias",
    "memorizing_bench",
    "memorizing_small",
    "memorizing_tiny",
    "relative_bias",
]
