"""The ``vanilla`` family's config and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from longrange.models.config import BENCH_SIZE, ModelConfig, PositiveFloat, PositiveInt, Probability


@dataclass(kw_only=True)
class VanillaConfig(ModelConfig):
    family = "vanilla"

    dim_head: PositiveInt | None = None  # default dim // heads
    ff_mult: PositiveInt = 4
    ff_glu: bool = False
    dropout: Probability = 0.0
    attn_dropout: Probability = 0.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    rotary_theta: PositiveFloat = 10000.0
    tie_embedding: bool = True
    attn_backend: Literal["sdpa", "naive"] = "sdpa"
    # training calls of at least this many positions keep only each block's input and run the
    # block again in backward (None: never)
    recompute_from: PositiveInt | None = None

    def check(self) -> None:
        super().check()
        if (self.dim_head or self.dim // self.heads) % 2:
            raise ValueError("the head width (dim_head or dim // heads) must be even for rotary")


def vanilla_tiny() -> VanillaConfig:
    return VanillaConfig(dim=64, depth=2, heads=2, max_seq_len=256)


def vanilla_small() -> VanillaConfig:
    return VanillaConfig(dim=256, depth=4, heads=4, max_seq_len=256)


def vanilla_bench() -> VanillaConfig:
    """The shared benchmark size; from 32K positions blocks are recomputed in backward, so
    that 64K positions train in under 2 GB."""
    return VanillaConfig(**BENCH_SIZE, max_seq_len=131072, recompute_from=32768)


PRESETS = {"tiny": vanilla_tiny, "small": vanilla_small, "bench": vanilla_bench}
