"""The family registry: the list of families, ``create_model``, presets, lookup by name.

:data:`FAMILIES` is the one place the families are listed; each is the package
``longrange.models.<name>``, imported on first use (so ``import longrange`` stays light and a
family that fails to import cannot break the others). Importing a family package registers its
config class, model class and presets with :func:`register_family`; the CLI, the trainer and
the benchmarks find everything through here (docs/ARCHITECTURE.md, "Adding a family").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAMILIES: tuple[str, ...] = ("vanilla", "performer", "routing", "sinkhorn", "block_recurrent", "memorizing")


@dataclass
class Family:
    name: str
    config_class: Any
    model_class: Any
    presets: dict[str, Callable[[], Any]] = field(default_factory=dict)
    description: str = ""


_FAMILIES: dict[str, Family] = {}


def family_module(name: str) -> str:
    return f"longrange.models.{name}"


def register_family(
    name: str,
    config_class: Any,
    model_class: Any,
    presets: dict[str, Callable[[], Any]],
    description: str = "",
) -> None:
    if name not in FAMILIES:
        raise ValueError(f"family {name!r} is not listed in longrange.models.registry.FAMILIES")
    _FAMILIES[name] = Family(name, config_class, model_class, dict(presets), description)


def available_families() -> list[str]:
    """Families whose package imports, in the order of :data:`FAMILIES`."""
    names = []
    for name in FAMILIES:
        try:
            get_family(name)
        except ValueError:
            continue
        names.append(name)
    return names


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        if name not in FAMILIES:
            raise ValueError(f"unknown model family {name!r}; accepted: {', '.join(FAMILIES)}")
        module = family_module(name)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            raise ValueError(f"model family {name!r} is not available in this build") from None
    return _FAMILIES[name]


def make_config(family: str, preset: str | None = None, **overrides: Any) -> Any:
    """A family's config from a preset (default: the config's defaults) plus overrides."""
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
    base.check_keys(overrides)
    return base.replace(**overrides)


def create_model(family: str, preset: str | None = None, **config: Any) -> Any:
    """Build a model of ``family`` from a preset and/or config keywords.

    >>> model = create_model("vanilla", preset="tiny", depth=2)
    """
    fam = get_family(family)
    return fam.model_class(make_config(family, preset, **config))
