"""Shared layers every family is assembled from (weights live here; the maths lives in ops/)."""

from longrange.modules.autopad import Autopadder
from longrange.modules.feedforward import Chunk, FeedForward, GEGLUFeedForward
from longrange.modules.local_attention import LocalAttention
from longrange.modules.moe import MoE
from longrange.modules.norms import LayerNorm, PreLayerNorm, PreNorm, PreScaleNorm, ReZero, RMSNorm, ScaleNorm
from longrange.modules.pkm import PKM
from longrange.modules.positional import (
    AbsolutePositionalEmbedding,
    AxialPositionalEmbedding,
    FixedPositionalEmbedding,
    T5RelativePositionBias,
)
from longrange.modules.project import ProjectInOut
from longrange.modules.reversible import ReversibleSequence, SequentialSequence, in_recomputation
from longrange.modules.rotary import RotaryEmbedding
from longrange.modules.shift import PreShiftTokens, shift_tokens

__all__ = [
    "PKM",
    "AbsolutePositionalEmbedding",
    "Autopadder",
    "AxialPositionalEmbedding",
    "Chunk",
    "FeedForward",
    "FixedPositionalEmbedding",
    "GEGLUFeedForward",
    "LayerNorm",
    "LocalAttention",
    "MoE",
    "PreLayerNorm",
    "PreNorm",
    "PreScaleNorm",
    "PreShiftTokens",
    "ProjectInOut",
    "RMSNorm",
    "ReZero",
    "ReversibleSequence",
    "RotaryEmbedding",
    "ScaleNorm",
    "SequentialSequence",
    "T5RelativePositionBias",
    "in_recomputation",
    "shift_tokens",
]
