"""``block_recurrent``: the Block-Recurrent Transformer (block attention + XL memory + gated
recurrent states), carried across segments by the segment flow (``models/flow.py``)."""

from longrange.models.block_recurrent.compat import (
    BlockRecurrentTransformer,
    RecurrentTrainerWrapper,
    XLMemoryList,
)
from longrange.models.block_recurrent.config import (
    PRESETS,
    BlockRecurrentConfig,
    block_recurrent_bench,
    block_recurrent_small,
    block_recurrent_tiny,
)
from longrange.models.block_recurrent.convert import convert_reference
from longrange.models.block_recurrent.model import BlockRecurrentLM
from longrange.models.registry import register_family

register_family(
    "block_recurrent",
    BlockRecurrentConfig,
    BlockRecurrentLM,
    PRESETS,
    description="block-recurrent transformer: block attention + XL memory + gated recurrent states",
)

EXPORTS = ("BlockRecurrentConfig", "BlockRecurrentLM", "BlockRecurrentTransformer", "RecurrentTrainerWrapper")
__all__ = [
    "BlockRecurrentConfig",
    "BlockRecurrentLM",
    "BlockRecurrentTransformer",
    "RecurrentTrainerWrapper",
    "XLMemoryList",
    "block_recurrent_bench",
    "block_recurrent_small",
    "block_recurrent_tiny",
    "convert_reference",
]
