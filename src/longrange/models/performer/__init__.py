"""``performer``: FAVOR+ random-feature attention, linear in length, running-sum decoding."""

from longrange.models.performer.compat import (
    AutoregressiveWrapper,
    Performer,
    PerformerEncDec,
    PerformerLM,
)
from longrange.models.performer.config import (
    PRESETS,
    PerformerConfig,
    performer_bench,
    performer_small,
    performer_tiny,
)
from longrange.models.performer.convert import convert_reference
from longrange.models.performer.fast_attention import FastAttention
from longrange.models.performer.layers import CrossAttention, SelfAttention
from longrange.models.performer.model import PerformerBody, PerformerModel
from longrange.models.registry import register_family

register_family(
    "performer",
    PerformerConfig,
    PerformerModel,
    PRESETS,
    description="Performer: FAVOR+ random-feature attention, linear in length, running-sum decoding",
)

EXPORTS = (
    "PerformerConfig",
    "PerformerModel",
    "PerformerLM",
    "Performer",
    "PerformerEncDec",
    "FastAttention",
)
__all__ = [
    "AutoregressiveWrapper",
    "CrossAttention",
    "FastAttention",
    "Performer",
    "PerformerBody",
    "PerformerConfig",
    "PerformerEncDec",
    "PerformerLM",
    "PerformerModel",
    "SelfAttention",
    "convert_reference",
    "performer_bench",
    "performer_small",
    "performer_tiny",
]
