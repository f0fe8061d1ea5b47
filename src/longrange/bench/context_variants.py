"""Every model setting of ``longrange bench context`` in one place.

- :data:`LM_MODELS`: each family's configuration for the language-model parts (position-wise
  loss, ablations, equal compute), trained at ``LM_CONTEXT`` = 4096 bytes per row and step.
- :data:`ABLATIONS`: each long-range mechanism against its own ablation. The "on" run is the
  family's :data:`LM_MODELS` entry; the "off" run is the same entry with ``setting`` applied
  and nothing else changed (same steps, seed, data order, call length). Where the library has
  no exact switch for "the same model without the mechanism", the nearest setting is used and
  its label says what it really is; a missing option is then a one-line change here.
- :data:`RECALL_MODELS`: the configurations of the long-distance recall part, whose local
  windows all lie below the shortest tested distance (256 tokens), so only a long-range
  mechanism (or exact attention) can answer.

``call_len`` (:class:`ModelSpec`): stateful families may be fed each training row and each
document in calls of this many tokens, the state carried between calls; it matters only where
a setting acts per call (block_recurrent's ``segment_carry``), so both sides of that ablation
use the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longrange.models.registry import create_model, get_family, make_config

LM_CONTEXT = 4096  # bytes per training row and step; the window of the non-stateful families
RECALL_WINDOW_CONTEXT = 8192  # recall: the window families' max_seq_len (a 4K example fits)


@dataclass(frozen=True)
class ModelSpec:
    """A family, its preset and config overrides, and how its input is fed."""

    family: str
    preset: str
    settings: dict[str, Any] = field(default_factory=dict)
    call_len: int | None = None  # None: one forward_lm call per training row / window

    def config_dict(self) -> dict[str, Any]:
        """The full model config (preset + settings) as plain JSON values."""
        return make_config(self.family, self.preset, **self.settings).to_dict()

    def build(self):
        return create_model(self.family, self.preset, **self.settings)

    def with_settings(self, extra: dict[str, Any]) -> ModelSpec:
        return ModelSpec(self.family, self.preset, {**self.settings, **extra}, self.call_len)

    def carries_state(self) -> bool:
        return get_family(self.family).model_class.carries_state


# Tiny presets (dim 64, depth 2) at 4096 bytes: a 2-core CPU trains them for some hundred steps
# in the default 75 s per run. Windows grow with the context where the family's cost depends on
# them (routing: sqrt(4096) = 64 clusters of 64; sinkhorn: 64 buckets of 64).
LM_MODELS: dict[str, ModelSpec] = {
    "vanilla": ModelSpec("vanilla", "tiny", {"max_seq_len": LM_CONTEXT}),
    "performer": ModelSpec("performer", "tiny", {"max_seq_len": LM_CONTEXT}),
    "routing": ModelSpec("routing", "tiny", {"max_seq_len": LM_CONTEXT, "window_size": 64}),
    "sinkhorn": ModelSpec("sinkhorn", "tiny", {"max_seq_len": LM_CONTEXT, "bucket_size": 64}),
    # blocks of 128 with one block of XL memory: attention reaches 128-256 bytes back, the
    # recurrent states the rest; fed one block per call so its ablation can reset per block
    "block_recurrent": ModelSpec(
        "block_recurrent",
        "tiny",
        {"max_seq_len": LM_CONTEXT, "block_width": 128, "num_state_vectors": 64},
        call_len=128,
    ),
    # chunks of 256 attended locally; the memory holds a whole evaluated document (16K)
    "memorizing": ModelSpec(
        "memorizing", "tiny", {"max_seq_len": 256, "max_knn_memories": 16384, "num_retrieved_memories": 16}
    ),
}


@dataclass(frozen=True)
class Ablation:
    """One mechanism against its ablation: ``on`` is the family's LM model, ``off`` the same
    with ``setting`` applied."""

    family: str
    name: str  # a short id, unique per family
    mechanism: str
    on: str  # what the "on" run is
    off: str  # what the "off" run is, honestly
    setting: dict[str, Any]

    def specs(self, base: ModelSpec | None = None) -> tuple[ModelSpec, ModelSpec]:
        """(on, off): ``base`` (default the family's :data:`LM_MODELS` entry) and the same
        with :attr:`setting` applied."""
        base = LM_MODELS[self.family] if base is None else base
        return base, base.with_settings(self.setting)


ABLATIONS: tuple[Ablation, ...] = (
    Ablation(
        "memorizing",
        "retrieval",
        "kNN retrieval",
        "16 memories retrieved of 16384",
        "no retrieval (num_retrieved_memories=0)",
        {"num_retrieved_memories": 0},
    ),
    Ablation(
        "memorizing",
        "memory-size",
        "kNN memory size",
        "16384 memories per row",
        "2048 memories per row",
        {"max_knn_memories": 2048},
    ),
    # The library has no switch for "the same sliding window without recurrent states"
    # (recurrent_layers=() is refused); resetting the states before every block of 128 is the
    # nearest: the states read are always the learned initial ones (a constant context).
    Ablation(
        "block_recurrent",
        "recurrence",
        "recurrent states",
        "states carried block to block",
        "states reset every block (segment_carry=xl_memory, one call per block)",
        {"segment_carry": "xl_memory"},
    ),
    Ablation(
        "routing",
        "routing",
        "routed heads",
        "2 routed + 2 local heads",
        "4 local heads (n_local_attn_heads=4)",
        {"n_local_attn_heads": 4},
    ),
    Ablation(
        "sinkhorn",
        "sorting",
        "sorted buckets",
        "2 sorted-bucket + 2 local heads",
        "4 local heads (n_local_attn_heads=4)",
        {"n_local_attn_heads": 4},
    ),
    # Exact attention on the same model: every head local. A local window looks back one
    # window, so windows of 2048 cover every earlier byte of a 4096 input (equal to one
    # window of 4096 within float rounding, at half its cost).
    Ablation(
        "performer",
        "favor",
        "FAVOR+ attention",
        "FAVOR+, 64 random features",
        "exact softmax attention (both heads local, windows of 2048 looking back one: all 4096)",
        {"local_attn_heads": (2,), "local_window_size": LM_CONTEXT // 2},
    ),
    Ablation(
        "performer",
        "features",
        "random feature count",
        "FAVOR+, 64 random features",
        "FAVOR+, 16 random features",
        {"nb_features": 16},
    ),
)


# Recall: local reach below 256 in every family (routing/sinkhorn local windows of 32 and 64,
# block_recurrent blocks of 32 + one block of XL memory, memorizing chunks of 128); performer
# has no local heads; vanilla's exact attention is its whole window. The memorizing memory
# (32768 per row) holds a whole 16K example.
RECALL_MODELS: dict[str, ModelSpec] = {
    "vanilla": ModelSpec("vanilla", "tiny", {"max_seq_len": RECALL_WINDOW_CONTEXT}),
    "performer": ModelSpec("performer", "tiny", {"max_seq_len": RECALL_WINDOW_CONTEXT}),
    "routing": ModelSpec("routing", "tiny", {"max_seq_len": RECALL_WINDOW_CONTEXT}),
    "sinkhorn": ModelSpec("sinkhorn", "tiny", {"max_seq_len": RECALL_WINDOW_CONTEXT}),
    "block_recurrent": ModelSpec("block_recurrent", "tiny"),
    "memorizing": ModelSpec("memorizing", "tiny", {"max_knn_memories": 32768}),
}


def recall_reach(spec: ModelSpec) -> tuple[int | None, str]:
    """(the longest input the family can read at once or None when unbounded, its reason)."""
    config = make_config(spec.family, spec.preset, **spec.settings)
    if spec.family == "memorizing":
        return config.max_knn_memories + config.max_seq_len, "kNN memory"
    if spec.carries_state():
        return None, "recurrent state"
    return config.max_seq_len, "context"


def lm_reach(spec: ModelSpec, window: int = LM_CONTEXT) -> int | None:
    """How far back the family can see in the position-wise evaluation (None: unbounded):
    a window family its trained ``window``, memorizing its memory plus one chunk."""
    config = make_config(spec.family, spec.preset, **spec.settings)
    if spec.family == "memorizing":
        return config.max_knn_memories + config.max_seq_len
    if spec.carries_state():
        return None
    return window


def check_families(families: list[str], table: dict[str, ModelSpec], part: str) -> None:
    missing = [f for f in families if f not in table]
    if missing:
        raise ValueError(
            f"bench context {part}: no configuration for {', '.join(missing)}; "
            f"accepted families: {', '.join(table)}"
        )
