"""The ``block_recurrent`` family's config and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from longrange.models.config import (
    BENCH_SIZE,
    LayerNumbers,
    ModelConfig,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)


@dataclass(kw_only=True)
class BlockRecurrentConfig(ModelConfig):
    family = "block_recurrent"

    dim_head: PositiveInt = 64
    ff_mult: PositiveFloat = 4.0
    block_width: PositiveInt = 512
    num_state_vectors: PositiveInt | None = None  # block_width when None
    recurrent_layers: LayerNumbers | None = None  # 1-based; (max(1, depth // 2),) when None
    read_recurrent_layers: LayerNumbers | None = None  # recurrent_layers when None
    all_layers_qk_rmsnorm: bool = False
    qk_rmsnorm_scale: float = 8.0
    use_compressed_mem: bool = False
    compressed_mem_factor: PositiveInt = 4
    xpos_scale_base: PositiveFloat = 512.0
    rotary_theta: PositiveFloat = 10000.0
    gate_type: Literal["fixed", "lstm"] = "fixed"
    # what forward_lm keeps of a state it is given: everything, the XL memory only (recurrent
    # states start over each segment) or nothing; the last two are baselines
    segment_carry: Literal["all", "xl_memory", "none"] = "all"
    ignore_index: int = -100
    attn_backend: Literal["sdpa", "naive"] = "sdpa"
    # A training call longer than this many tokens runs in segments of it whose activations
    # are recomputed in the backward pass (memory bounded by one segment; 0: never)
    recompute_segment: NonNegativeInt = 8192

    def write_layers(self) -> tuple[int, ...]:
        return self.recurrent_layers if self.recurrent_layers is not None else (max(1, self.depth // 2),)

    def read_layers(self) -> tuple[int, ...]:
        return self.read_recurrent_layers if self.read_recurrent_layers is not None else self.write_layers()

    def state_vectors(self) -> int:
        return self.num_state_vectors if self.num_state_vectors is not None else self.block_width

    def check(self) -> None:
        super().check()
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary positions), got {self.dim_head}")
        if self.max_seq_len % self.block_width:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be divisible by block_width ({self.block_width})"
            )
        writes, reads = self.write_layers(), self.read_layers()
        if not writes:
            raise ValueError("recurrent_layers must name at least one layer")
        if len(set(writes)) != len(writes):
            raise ValueError(f"recurrent_layers must be unique, got {writes}")
        if len(reads) != len(writes):
            raise ValueError(
                f"read_recurrent_layers {reads} must have one entry per recurrent layer {writes}"
            )
        if any(r > w for r, w in zip(reads, writes, strict=True)):
            raise ValueError(
                f"each read layer must be <= its write layer; got read {reads} for write {writes}"
            )
        if self.use_compressed_mem and (self.compressed_mem_factor < 2 or self.block_width < 2):
            raise ValueError("use_compressed_mem needs compressed_mem_factor >= 2 and block_width >= 2")


def block_recurrent_tiny() -> BlockRecurrentConfig:
    return BlockRecurrentConfig(
        dim=64, depth=2, heads=2, dim_head=32, block_width=32, num_state_vectors=16, max_seq_len=128
    )


def block_recurrent_small() -> BlockRecurrentConfig:
    return BlockRecurrentConfig(
        dim=256, depth=4, heads=4, dim_head=64, block_width=128, num_state_vectors=64, max_seq_len=512
    )


def block_recurrent_bench() -> BlockRecurrentConfig:
    """The shared benchmark size with the reference's defaults: blocks of 512, 512 state
    vectors, one recurrent layer in the middle."""
    return BlockRecurrentConfig(**BENCH_SIZE, dim_head=64, block_width=512, max_seq_len=65536)


PRESETS = {"tiny": block_recurrent_tiny, "small": block_recurrent_small, "bench": block_recurrent_bench}
