"""``memorizing``: the Memorizing Transformer (local attention + top-k retrieval from a kNN
memory of past keys/values), carried across chunks by the segment flow (``models/flow.py``)."""

from longrange.memory.knn import KNNMemory, KNNMemoryList
from longrange.models.memorizing.compat import MemorizingTransformer
from longrange.models.memorizing.config import (
    PRESETS,
    MemorizingConfig,
    memorizing_bench,
    memorizing_small,
    memorizing_tiny,
)
from longrange.models.memorizing.convert import convert_reference
from longrange.models.memorizing.layers import (
    Attention,
    KNNAttention,
    MemorizingBlock,
    causal_bias,
    relative_bias,
)
from longrange.models.memorizing.model import MemorizingLM
from longrange.models.registry import register_family

register_family(
    "memorizing",
    MemorizingConfig,
    MemorizingLM,
    PRESETS,
    description="local attention + top-k retrieval from a kNN memory of past keys/values (faiss)",
)

EXPORTS = (
    "KNNAttention",
    "KNNMemory",
    "KNNMemoryList",
    "MemorizingConfig",
    "MemorizingLM",
    "MemorizingTransformer",
)
__all__ = [
    "Attention",
    "KNNAttention",
    "KNNMemory",
    "KNNMemoryList",
    "MemorizingBlock",
    "MemorizingConfig",
    "MemorizingLM",
    "MemorizingTransformer",
    "causal_bias",
    "convert_reference",
    "memorizing_bench",
    "memorizing_small",
    "memorizing_tiny",
    "relative_bias",
]
