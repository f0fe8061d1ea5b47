"""The ``routing`` family's config and presets.

The fields are the ``routing_transformer`` package's keywords (1.6.1) under longrange's
names; their annotations are their checks (docs/ARCHITECTURE.md, "Configs"). What relates
two fields is in :meth:`RoutingConfig.check`: the number of clusters is
``max_seq_len // window_size`` (as in the reference), so the window must divide the length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from longrange.models.config import (
    BENCH_SIZE,
    LayerNumbers,
    ModelConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Probability,
    RecomputeRule,
    Rule,
    recomputes,
)

# the feed-forward activations a config may name (the reference took an nn.Module class)
Activation = Literal["gelu", "relu", "silu", "tanh", "leaky_relu", "sigmoid"]
UnitInterval = Annotated[float, Rule("a number in [0, 1]", lambda v, c: 0 <= v <= 1)]
AtLeastTwo = Annotated[int, Rule("an integer >= 2", lambda v, c: v >= 2)]


def _local_heads_ok(value: int | tuple[int, ...], config: RoutingConfig) -> bool:
    heads = value if isinstance(value, tuple) else (value,)
    return (not isinstance(value, tuple) or len(value) == config.depth) and all(
        0 <= n <= config.heads for n in heads
    )


LocalHeads = Annotated[
    int | tuple[int, ...],
    Rule(
        lambda c: f"an integer in [0, heads={c.heads}] or a tuple of {c.depth} of them (one per layer)",
        _local_heads_ok,
    ),
]


@dataclass(kw_only=True)
class RoutingConfig(ModelConfig):
    family = "routing"

    dim_head: PositiveInt | None = None
    window_size: PositiveInt = 64
    local_attn_window_size: PositiveInt | None = None
    local_attn_radius_blocks: NonNegativeInt = 1
    n_local_attn_heads: LocalHeads = 0
    causal: bool = True
    emb_dim: PositiveInt | None = None
    weight_tie: bool = False
    attn_dropout: Probability = 0.0
    ff_dropout: Probability = 0.0
    attn_layer_dropout: Probability = 0.0
    layer_dropout: Probability = 0.0
    ff_mult: PositiveInt = 4
    ff_activation: Activation | None = None
    ff_glu: bool = False
    ff_chunks: PositiveInt = 1
    reversible: bool = False
    kmeans_ema_decay: UnitInterval = 0.999
    commitment_factor: NonNegativeFloat = 1e-4
    kmeans_update_on_backward: bool = True
    receives_context: bool = False
    context_window_size: PositiveInt | None = None
    rel_pos_emb: bool = True
    pkm_layers: LayerNumbers = ()
    pkm_num_keys: PositiveInt = 128
    moe_layers: LayerNumbers = ()
    moe_num_experts: AtLeastTwo = 4
    moe_loss_coef: NonNegativeFloat = 1e-2
    num_mem_kv: NonNegativeInt = 0
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
    # Recompute every attention branch in backward, keeping only its input (models.config:
    # RECOMPUTE_POSITIONS, recomputes)
    recompute_attention: RecomputeRule = "auto"

    def __post_init__(self) -> None:
        # the reference accepts a list of per-layer head counts
        if isinstance(self.n_local_attn_heads, list):
            self.n_local_attn_heads = tuple(self.n_local_attn_heads)
        super().__post_init__()

    def check(self) -> None:
        super().check()
        if self.max_seq_len % self.window_size:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be divisible by window_size "
                f"({self.window_size}): it sets the number of clusters"
            )
        if self.weight_tie and len(set(self.local_heads())) > 1:
            raise ValueError("weight_tie needs the same n_local_attn_heads in every layer")
        if (self.dim_head or self.dim // self.heads) % 2:
            raise ValueError("the head width (dim_head or dim // heads) must be even for rotary positions")

    def local_heads(self) -> tuple[int, ...]:
        """Local attention heads of every layer."""
        n = self.n_local_attn_heads
        return tuple(n) if isinstance(n, tuple) else (n,) * self.depth

    def recompute_for(self, positions: int) -> bool:
        """Whether a call of ``positions`` (batch x length) recomputes its attention branches."""
        return recomputes(self.recompute_attention, positions)

    @property
    def num_clusters(self) -> int:
        return self.max_seq_len // self.window_size


def routing_tiny() -> RoutingConfig:
    return RoutingConfig(dim=64, depth=2, heads=4, n_local_attn_heads=2, window_size=32, max_seq_len=256)


def routing_small() -> RoutingConfig:
    return RoutingConfig(dim=256, depth=4, heads=4, n_local_attn_heads=2, window_size=64, max_seq_len=512)


def routing_bench() -> RoutingConfig:
    """The shared benchmark size with 2 local heads and window 128; the benchmark raises
    max_seq_len to the measured length (so clusters = length / 128)."""
    return RoutingConfig(**BENCH_SIZE, n_local_attn_heads=2, window_size=128, max_seq_len=1024)


PRESETS = {"tiny": routing_tiny, "small": routing_small, "bench": routing_bench}
