"""``sinkhorn``: Sparse Sinkhorn attention, learned bucket sorting, SortCut, causal sorting."""

from longrange.models.registry import register_family
from longrange.models.sinkhorn.compat import (
    Autopadder,
    AutoregressiveWrapper,
    SinkhornTransformer,
    SinkhornTransformerEncDec,
    SinkhornTransformerLM,
)
from longrange.models.sinkhorn.config import (
    PRESETS,
    SinkhornConfig,
    sinkhorn_bench,
    sinkhorn_small,
    sinkhorn_tiny,
)
from longrange.models.sinkhorn.convert import convert_reference
from longrange.models.sinkhorn.layers import SinkhornSelfAttention
from longrange.models.sinkhorn.model import SinkhornBody, SinkhornLM

register_family(
    "sinkhorn",
    SinkhornConfig,
    SinkhornLM,
    PRESETS,
    description="Sparse Sinkhorn attention: learned bucket sorting, SortCut, causal sorting",
)

EXPORTS = (
    "SinkhornConfig",
    "SinkhornLM",
    "SinkhornTransformerLM",
    "SinkhornTransformer",
    "SinkhornTransformerEncDec",
    "SinkhornSelfAttention",
)
__all__ = [
    "Autopadder",
    "AutoregressiveWrapper",
    "SinkhornBody",
    "SinkhornConfig",
    "SinkhornLM",
    "SinkhornSelfAttention",
    "SinkhornTransformer",
    "SinkhornTransformerEncDec",
    "SinkhornTransformerLM",
    "convert_reference",
    "sinkhorn_bench",
    "sinkhorn_small",
    "sinkhorn_tiny",
]
