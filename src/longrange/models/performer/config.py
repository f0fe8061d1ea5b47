"""The ``performer`` family's config and presets.

Fields carry ``performer_pytorch``'s names; ``local_attn_heads`` holds one count for every
layer or one per layer. longrange-only fields: ``ortho_scaling``, ``chunk_size`` and
``attn_backend`` (the causal op), ``feature_eps`` (the epsilon inside non-causal softmax
features, the reference's 1e-4; causal features carry none), ``kernel_eps`` (the generalized
kernel's epsilon), ``recompute_attention`` (keep only each attention branch's input in
training and run the branch again in backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from longrange.models.config import (
    BENCH_SIZE,
    ModelConfig,
    NonNegativeFloat,
    PositiveInt,
    Probability,
    Rule,
)

# the kernel functions a config can name ("custom": a callable passed to the model)
KernelName = Literal[
    "relu", "gelu", "elu", "silu", "softplus", "sigmoid", "tanh", "leaky_relu", "identity", "custom"
]

LocalHeads = Annotated[
    tuple[int, ...],
    Rule(
        lambda c: (
            f"one count for every layer or one per layer (depth {c.depth}), each in [0, heads={c.heads}]"
        ),
        lambda v, c: len(v) in (1, c.depth) and all(0 <= n <= c.heads for n in v),
    ),
]


@dataclass(kw_only=True)
class PerformerConfig(ModelConfig):
    """The Performer LM (see the module docstring)."""

    family = "performer"

    dim_head: PositiveInt = 64
    local_attn_heads: LocalHeads = (0,)
    local_window_size: PositiveInt = 256
    causal: bool = True
    ff_mult: PositiveInt = 4
    nb_features: PositiveInt | None = None
    ortho_scaling: Literal[0, 1] = 0
    feature_redraw_interval: PositiveInt | None = 1000
    auto_check_redraw: bool = True
    reversible: bool = False
    ff_chunks: PositiveInt = 1
    ff_glu: bool = False
    emb_dropout: Probability = 0.0
    ff_dropout: Probability = 0.0
    attn_dropout: Probability = 0.0
    generalized_attention: bool = False
    kernel_fn: KernelName = "relu"
    kernel_eps: float = 1e-3
    feature_eps: NonNegativeFloat = 1e-4
    use_scalenorm: bool = False
    use_rezero: bool = False
    cross_attend: bool = False
    no_projection: bool = False
    tie_embed: bool = False
    rotary_position_emb: bool = True
    axial_position_emb: bool = False
    axial_position_shape: tuple[int, ...] | None = None
    qkv_bias: bool = False
    attn_out_bias: bool = False
    shift_tokens: bool = False
    # positions per causal FAVOR+ chunk: the op's CHUNK_SIZE (ops/favor/fused.py, where the
    # choice is measured), written out because configs import no torch
    chunk_size: PositiveInt = 64
    attn_backend: Literal["auto", "fused", "chunk", "naive"] = "auto"
    recompute_attention: bool = False

    def local_heads(self) -> tuple[int, ...]:
        """Local attention heads of every layer."""
        heads = self.local_attn_heads
        return heads * self.depth if len(heads) == 1 else heads

    def check(self) -> None:
        super().check()
        if self.use_scalenorm and self.use_rezero:
            raise ValueError("use_scalenorm and use_rezero exclude each other; pick one")
        if self.no_projection and self.generalized_attention:
            raise ValueError("no_projection and generalized_attention exclude each other; pick one")
        if self.no_projection and self.nb_features is not None:
            raise ValueError("nb_features has no effect with no_projection=True")
        if self.kernel_fn != "relu" and not self.generalized_attention:
            raise ValueError("kernel_fn is used only with generalized_attention=True")
        if self.rotary_position_emb and self.axial_position_emb:
            raise ValueError(
                "rotary_position_emb and axial_position_emb exclude each other (the reference "
                "silently used rotary); pass rotary_position_emb=False for axial positions"
            )
        if self.axial_position_shape is not None:
            shape = self.axial_position_shape
            if not self.axial_position_emb:
                raise ValueError("axial_position_shape needs axial_position_emb=True")
            if math.prod(shape) < self.max_seq_len:
                raise ValueError(f"axial_position_shape {shape} covers fewer than max_seq_len positions")
        if self.dim_head % 2:
            raise ValueError(f"dim_head must be even (rotary positions), got {self.dim_head}")
        if self.dim % 2:
            raise ValueError(f"dim must be even (sinusoidal positions), got {self.dim}")

    @property
    def norm_kind(self) -> str:
        return "scale" if self.use_scalenorm else "rezero" if self.use_rezero else "layer"


def performer_tiny() -> PerformerConfig:
    return PerformerConfig(dim=64, depth=2, heads=2, dim_head=32, nb_features=64, max_seq_len=256)


def performer_small() -> PerformerConfig:
    """Like the reference's enwik8 example, scaled down: local heads in the lower layers,
    token shift, 128 features."""
    return PerformerConfig(
        dim=256,
        depth=4,
        heads=4,
        dim_head=64,
        local_attn_heads=(2, 2, 1, 1),
        local_window_size=128,
        nb_features=128,
        shift_tokens=True,
        max_seq_len=512,
    )


def performer_bench() -> PerformerConfig:
    """The shared benchmark size, all heads FAVOR+, tuned for long inputs: 64 features (one
    orthogonal block; the default D log D would be 266), chunks of 64, attention branches
    recomputed in backward and the feed-forward formed a quarter of the sequence at a time,
    so that a layer keeps little more than its input for backward."""
    return PerformerConfig(
        **BENCH_SIZE,
        dim_head=64,
        nb_features=64,
        chunk_size=64,
        recompute_attention=True,
        ff_chunks=4,
        max_seq_len=65536,
    )


PRESETS = {"tiny": performer_tiny, "small": performer_small, "bench": performer_bench}
