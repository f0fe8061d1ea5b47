"""longrange: efficient long-context transformers on one set of tested layers.

The public API: ``create_model``, the model base class, ``generate``, the wrappers, and every
family's main names (``VanillaLM``, ``PerformerLM``, ``RoutingTransformerLM``, ...: each
family package's ``EXPORTS``). Family packages are imported on first use, so ``import
longrange`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from longrange.convert import load_reference
from longrange.generation import generate
from longrange.models.autoregressive import AutoregressiveWrapper
from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.config import ModelConfig
from longrange.models.registry import FAMILIES, available_families, create_model, family_module, make_config
from longrange.models.state import State
from longrange.modules.autopad import Autopadder

__version__ = "0.1.0"


def _family_names() -> dict[str, str]:
    """Public name -> the family package that defines it (imports the families)."""
    names: dict[str, str] = {}
    for family in FAMILIES:
        module = importlib.import_module(family_module(family))
        for name in module.EXPORTS:
            names.setdefault(name, module.__name__)
    return names


def __getattr__(name: str) -> Any:
    if not name.startswith("_"):
        module = _family_names().get(name)
        if module is not None:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'longrange' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_family_names()})


__all__ = [
    "Autopadder",
    "AutoregressiveWrapper",
    "LMOutput",
    "LongRangeLM",
    "ModelConfig",
    "State",
    "available_families",
    "create_model",
    "generate",
    "load_reference",
    "make_config",
]
