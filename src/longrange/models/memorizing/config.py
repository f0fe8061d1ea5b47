"""The ``memorizing`` family's config and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from longrange.models.config import (
    BENCH_SIZE,
    LayerNumbers,
    ModelConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Rule,
)

TokenId = Annotated[
    int, Rule(lambda c: f"a token id in [0, {c.vocab_size})", lambda v, c: 0 <= v < c.vocab_size)
]


@dataclass(kw_only=True)
class MemorizingConfig(ModelConfig):
    family = "memorizing"

    max_seq_len: PositiveInt = 512  # the chunk: tokens attended locally; longer inputs run chunk by chunk
    dim_head: PositiveInt | None = None  # default dim // heads
    knn_attn_heads: PositiveInt | None = None  # heads of the memorizing layers (default heads)
    attn_dropout: Probability = 0.0
    ff_mult: PositiveInt = 4
    ff_dropout: Probability = 0.0
    memorizing_layers: LayerNumbers | None = None  # 1-based; default (max(1, depth // 2),)
    max_knn_memories: PositiveInt = 250000  # per memorizing layer and batch row
    num_retrieved_memories: NonNegativeInt = 32
    clear_memories_on_sos_token_id: TokenId | None = None
    clear_memories_on_eos_token_id: TokenId | None = None
    knn_memories_directory: str | None = None  # parent of the memory files (None: system temp)
    shift_knn_memories_down: NonNegativeInt = 0
    shift_xl_memories_down: NonNegativeInt = 0
    pad_id: int = 0  # ignore_index of the reference-style loss (labels=...)
    xl_max_memories: NonNegativeInt = 0
    xl_memory_layers: LayerNumbers | None = None  # 1-based; default all layers
    # XL memories keep each layer's attention input and project it with the current weights
    # every chunk (Transformer-XL), instead of keys/values projected when they were made (the
    # reference); the kNN memory then gets keys/values projected as entries leave the window
    xl_reproject: bool = False
    knn_memory_multiprocessing: bool = False
    knn_backend: Literal["auto", "exact", "faiss"] = "auto"
    # "auto": exact while a memory row is small, an inverted-file index beyond (faiss backend)
    knn_index: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    knn_gate_output: bool = False
    # how retrieved memories join the local keys: "softmax" (one softmax over both, as the
    # reference) or "gate" (the paper: a softmax each, mixed by a learned per-head sigmoid gate)
    knn_combine: Literal["softmax", "gate"] = "softmax"
    shift_tokens: bool = False  # half the attention input features from the previous position
    attn_scale_init: PositiveFloat = 20.0
    rel_pos_num_buckets: PositiveInt = 32
    rel_pos_max_distance: PositiveInt = 128

    def check(self) -> None:
        super().check()
        if self.knn_backend == "exact" and self.knn_index not in ("auto", "flat"):
            raise ValueError(f"knn_index={self.knn_index!r} needs knn_backend='faiss' (exact search is flat)")

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
    """The benchmark size with chunks of 512 and the default kNN memory (250,000 entries per
    row, the index chosen by size: exact while small, an inverted file beyond)."""
    return MemorizingConfig(**BENCH_SIZE, max_seq_len=512)


PRESETS = {"tiny": memorizing_tiny, "small": memorizing_small, "bench": memorizing_bench}
