"""The family registry: ``create_model``, presets, and lookup by name.

A family registers its config class, its model class and its preset functions; the CLI, the
trainer and the benchmarks find everything through here, so a new family appears everywhere
by registering itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from longrange.models.base import LongRangeLM
    from longrange.models.config import ModelConfig


@dataclass
class Family:
    name: str
    config_class: type[ModelConfig]
    model_class: type[LongRangeLM]
    presets: dict[str, Callable[[], ModelConfig]] = field(default_factory=dict)
    description: str = ""


_FAMILIES: dict[str, Family] = {}
# Modules that register a family when imported; imported lazily so that `import longrange`
# stays cheap and a broken family cannot break the others.
FAMILY_MODULES = {
    "vanilla": "longrange.models.vanilla",
    "performer": "longrange.models.performer",
    "routing": "longrange.models.routing",
    "sinkhorn": "longrange.models.sinkhorn",
    "block_recurrent": "longrange.models.block_recurrent",
    "memorizing": "longrange.models.memorizing",
}


def register_family(
    name: str,
    config_class: type[ModelConfig],
    model_class: type[LongRangeLM],
    presets: dict[str, Callable[[], ModelConfig]],
    description: str = "",
) -> None:
    _FAMILIES[name] = Family(name, config_class, model_class, dict(presets), description)


def available_families() -> list[str]:
    """Families whose module imports (in the order of FAMILY_MODULES)."""
    names = []
    for name in FAMILY_MODULES:
        try:
            get_family(name)
        except ValueError:
            continue
        names.append(name)
    return names


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        module = FAMILY_MODULES.get(name)
        if module is None:
            raise ValueError(f"unknown model family {name!r}; accepted: {', '.join(FAMILY_MODULES)}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            raise ValueError(f"model family {name!r} is not available in this build") from None
    return _FAMILIES[name]


def make_config(family: str, preset: str | None = None, **overrides: Any) -> ModelConfig:
    """A family's config from a preset (default: the family's first preset) plus overrides."""
    fam = get_family(family)
    if preset is None:
        base = fam.config_class()
    else:
        if preset not in fam.presets:
            raise ValueError(
                f"unknown preset {preset!r} for family {family!r}; accepted: {', '.join(fam.presets)}"
            )
        base = fam.presets[preset]()
    if not overrides:
        return base
    unknown = sorted(set(overrides) - set(fam.config_class.field_names()))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} for family {family!r}; "
            f"accepted: {', '.join(fam.config_class.field_names())}"
        )
    return base.replace(**overrides)


def create_model(family: str, preset: str | None = None, **config: Any) -> LongRangeLM:
    """Build a model of ``family`` from a preset and/or config keywords.

    >>> model = create_model("vanilla", preset="tiny", depth=2)
    """
    fam = get_family(family)
    return fam.model_class(make_config(family, preset, **config))
