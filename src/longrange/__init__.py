"""longrange: efficient long-context transformers on one set of tested layers.

The public API: ``create_model``, the model base class, each family's config and model
classes, and the names of the reference packages (``PerformerLM``, ``RoutingTransformerLM``,
...). Family modules are imported on first use, so ``import longrange`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from longrange.generation import generate
from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.config import ModelConfig
from longrange.models.registry import available_families, create_model, make_config
from longrange.modules.autopad import Autopadder
from longrange.modules.autoregressive import AutoregressiveWrapper

__version__ = "0.1.0"

_FAMILY_EXPORTS = {
    "longrange.models.vanilla": ["VanillaConfig", "VanillaLM"],
    "longrange.models.performer": [
        "PerformerConfig",
        "PerformerModel",
        "PerformerLM",
        "Performer",
        "PerformerEncDec",
        "FastAttention",
    ],
    "longrange.models.routing": [
        "RoutingConfig",
        "RoutingLM",
        "RoutingTransformerLM",
        "RoutingTransformer",
        "RoutingTransformerEncDec",
        "KmeansAttention",
    ],
    "longrange.models.sinkhorn": [
        "SinkhornConfig",
        "SinkhornLM",
        "SinkhornTransformerLM",
        "SinkhornTransformer",
        "SinkhornTransformerEncDec",
        "SinkhornSelfAttention",
    ],
    "longrange.models.block_recurrent": [
        "BlockRecurrentConfig",
        "BlockRecurrentLM",
        "BlockRecurrentTransformer",
        "RecurrentTrainerWrapper",
    ],
    "longrange.models.memorizing": [
        "MemorizingConfig",
        "MemorizingLM",
        "MemorizingTransformer",
        "KNNAttention",
        "KNNMemory",
        "KNNMemoryList",
    ],
    "longrange.convert": ["load_reference"],
}
# Public name -> module that defines it (imported lazily by __getattr__).
_LAZY = {name: module for module, names in _FAMILY_EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longrange' has no attribute {name!r}")


__all__ = [
    "AutoregressiveWrapper",
    "Autopadder",
    "LMOutput",
    "LongRangeLM",
    "ModelConfig",
    "available_families",
    "create_model",
    "generate",
    "make_config",
    *_LAZY,
]
