"""The ``sinkhorn`` family's config and presets (fields carry sinkhorn-transformer's names)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from longrange.models.config import (
    BENCH_SIZE,
    LayerNumbers,
    ModelConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    RecomputeRule,
    recomputes,
)


@dataclass(kw_only=True)
class SinkhornConfig(ModelConfig):
    """The Sinkhorn LM. ``dim_head`` None means dim // heads (then dim must divide)."""

    family = "sinkhorn"

    dim_head: PositiveInt | None = None
    bucket_size: PositiveInt = 64
    kv_bucket_size: PositiveInt | None = None
    context_bucket_size: PositiveInt | None = None
    causal: bool = True
    non_permutative: bool = True
    sinkhorn_iter: PositiveInt = 5
    n_sortcut: NonNegativeInt = 0
    temperature: PositiveFloat = 0.75
    n_top_buckets: PositiveInt = 2
    use_simple_sort_net: bool = False
    n_local_attn_heads: NonNegativeInt = 0
    reversible: bool = False
    ff_chunks: PositiveInt = 1
    ff_glu: bool = False
    ff_dropout: Probability = 0.0
    attn_dropout: Probability = 0.0
    attn_layer_dropout: Probability = 0.0
    layer_dropout: Probability = 0.0
    emb_dropout: Probability = 0.0
    weight_tie: bool = False
    emb_dim: PositiveInt | None = None
    use_rezero: bool = False
    pkm_layers: LayerNumbers = ()
    pkm_num_keys: PositiveInt = 128
    receives_context: bool = False
    context_n_sortcut: NonNegativeInt = 0
    return_embeddings: bool = False
    axial_shape: tuple[int, ...] | None = None
    attn_backend: Literal["auto", "naive"] = "auto"
    # Recompute attention branches in backward, keeping only their input (models.config:
    # RECOMPUTE_POSITIONS, recomputes); under "auto" the last block keeps its activations
    # (model.KEEP_LAST_ATTENTION), "always" recomputes every block
    recompute_attention: RecomputeRule = "auto"

    def check(self) -> None:
        # with its own head width, dim need not divide into the heads
        if self.dim_head is None:
            super().check()
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
        if self.axial_shape is not None and math.prod(self.axial_shape) < self.max_seq_len:
            raise ValueError(f"axial_shape {self.axial_shape} must cover max_seq_len={self.max_seq_len}")

    def recompute_for(self, positions: int) -> bool:
        """Whether a call of ``positions`` (batch x length) recomputes its attention branches."""
        return recomputes(self.recompute_attention, positions)

    @property
    def pad_multiple(self) -> int:
        return math.lcm(self.bucket_size, self.kv_bucket_size or self.bucket_size)

    def positions_shape(self) -> tuple[int, ...]:
        if self.axial_shape is not None:
            return tuple(self.axial_shape)
        return (-(-self.max_seq_len // self.bucket_size), self.bucket_size)


def sinkhorn_tiny() -> SinkhornConfig:
    return SinkhornConfig(dim=64, depth=2, heads=4, bucket_size=32, max_seq_len=256, n_local_attn_heads=2)


def sinkhorn_small() -> SinkhornConfig:
    return SinkhornConfig(dim=256, depth=4, heads=4, bucket_size=64, max_seq_len=512, n_local_attn_heads=2)


def sinkhorn_bench() -> SinkhornConfig:
    """The shared benchmark size; bucket 128, causal."""
    return SinkhornConfig(**BENCH_SIZE, bucket_size=128, max_seq_len=65536)


PRESETS = {"tiny": sinkhorn_tiny, "small": sinkhorn_small, "bench": sinkhorn_bench}
