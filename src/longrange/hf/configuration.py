"""The transformers config of a longrange family.

:class:`LongRangeConfig` is a ``PretrainedConfig`` whose attributes are the family config's
fields, flat, under the same names (``dim``, ``depth``, ``max_seq_len``, ...), next to
transformers' own keys (``model_type``, ``architectures``, ``transformers_version``, ...) and
a ``"family"`` key. Its ``config.json`` is therefore the longrange ``config.json`` plus those
keys. The values are checked by the family's own config dataclass when the config is made, so
a bad value is the same ``ValueError`` it is in longrange.

One subclass per family (:func:`config_class_for`), with ``model_type`` ``"longrange_<family>"``,
because the Auto classes dispatch on ``model_type``. The standard names transformers and its
tools read are mapped onto longrange's: ``hidden_size`` -> ``dim``, ``num_hidden_layers`` ->
``depth``, ``num_attention_heads`` -> ``heads``, ``max_position_embeddings`` -> ``max_seq_len``
(lm-evaluation-harness takes its window length from the last).

``segment_long_inputs`` (default False) is the one setting of the transformers wrapper itself:
when True, a forward call longer than ``max_seq_len`` is read in segments of ``max_seq_len``
the way ``longrange eval`` reads a document (the state carried across segments for the
families that carry state, each segment on its own otherwise); when False such a call is
refused, as ``forward_lm`` refuses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PretrainedConfig

from longrange.models.config import ModelConfig
from longrange.models.registry import FAMILIES, get_family

MODEL_TYPE_PREFIX = "longrange_"
# Keys of a longrange config.json that transformers' side does not keep as fields.
FAMILY_KEY = "family"


def model_type_for(family: str) -> str:
    return f"{MODEL_TYPE_PREFIX}{family}"


def family_of_model_type(model_type: str) -> str:
    """``"longrange_vanilla"`` -> ``"vanilla"``; ValueError for a model type that is not ours."""
    family = model_type.removeprefix(MODEL_TYPE_PREFIX)
    if not model_type.startswith(MODEL_TYPE_PREFIX) or family not in FAMILIES:
        accepted = ", ".join(model_type_for(f) for f in FAMILIES)
        raise ValueError(f"model_type {model_type!r} is not a longrange family; accepted: {accepted}")
    return family


class LongRangeConfig(PretrainedConfig):
    """Base of the per-family configs; use :func:`config_class_for` (or the Auto classes)."""

    model_type = "longrange"
    family: ClassVar[str] = ""
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "heads",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(self, segment_long_inputs: bool = False, **kwargs: Any) -> None:
        if not self.family:
            raise TypeError("LongRangeConfig is abstract: use longrange.hf.config_class_for(family)")
        given = kwargs.pop(FAMILY_KEY, self.family)
        if given != self.family:
            raise ValueError(f"config is for family {given!r}, not {self.family!r}")
        if not isinstance(segment_long_inputs, bool):
            raise ValueError(f"segment_long_inputs must be True or False, got {segment_long_inputs!r}")
        config_class = get_family(self.family).config_class
        fields = config_class.field_names()
        settings = {name: kwargs.pop(name) for name in fields if name in kwargs}
        checked = config_class.from_dict({FAMILY_KEY: self.family, **settings})
        for name, value in dataclasses.asdict(checked).items():
            setattr(self, name, value)
        self.segment_long_inputs = segment_long_inputs
        super().__init__(**kwargs)

    # --- longrange <-> transformers -------------------------------------------------------
    def longrange_config(self) -> ModelConfig:
        """The family's config dataclass with this config's values (checked again)."""
        config_class = get_family(self.family).config_class
        values = {name: getattr(self, name) for name in config_class.field_names()}
        return config_class.from_dict({FAMILY_KEY: self.family, **values})

    @classmethod
    def from_longrange(cls, config: ModelConfig, **kwargs: Any) -> LongRangeConfig:
        """The transformers config of a longrange config (of this class's family when called
        on a family class, of ``config.family`` when called on the base)."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a longrange ModelConfig, got {type(config).__name__}")
        target = config_class_for(config.family) if not cls.family else cls
        if target.family != config.family:
            raise ValueError(f"{cls.__name__} is for family {cls.family!r}, not {config.family!r}")
        return target(**config.to_dict(), **kwargs)

    def _get_generation_parameters(self) -> dict[str, Any]:
        # A family field may share a sampling option's name (sinkhorn's sort ``temperature``):
        # it is the model's setting, not a generation parameter.
        ours = set(get_family(self.family).config_class.field_names())
        return {k: v for k, v in super()._get_generation_parameters().items() if k not in ours}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out[FAMILY_KEY] = self.family
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # Every longrange field is written, defaults included, so the longrange half of the
        # file reads back the same whatever the defaults of a later version.
        out = super().to_diff_dict()
        out[FAMILY_KEY] = self.family
        for name in get_family(self.family).config_class.field_names():
            out[name] = _json_value(getattr(self, name))
        return out


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_CONFIG_CLASSES: dict[str, type[LongRangeConfig]] = {}


def config_class_for(family: str) -> type[LongRangeConfig]:
    """The config class of ``family`` (made once; its ``model_type`` is
    ``"longrange_<family>"``). The family itself is imported only when a config is made."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; accepted: {', '.join(FAMILIES)}")
    if family not in _CONFIG_CLASSES:
        name = f"LongRange{_camel(family)}Config"
        cls = type(
            name,
            (LongRangeConfig,),
            {
                "model_type": model_type_for(family),
                "family": family,
                "__module__": __name__,
                # transformers turns a config subclass without its own __init__ into a dataclass
                # with a generated one; the family classes keep the base's.
                "__init__": LongRangeConfig.__init__,
            },
        )
        _CONFIG_CLASSES[family] = cls
        globals()[name] = cls  # importable by name (pickling, transformers' class lookups)
    return _CONFIG_CLASSES[family]


def _camel(family: str) -> str:
    return "".join(part.capitalize() for part in family.split("_"))
