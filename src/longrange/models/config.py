"""Config dataclasses: one per family, keyword-only, JSON round-trip, typed ``--set`` parsing."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every family shares. Families subclass it and add their own."""

    family: ClassVar[str] = ""

    vocab_size: int = 256
    max_seq_len: int = 1024
    dim: int = 256
    depth: int = 4
    heads: int = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. Families extend it."""
        for name in ("vocab_size", "max_seq_len", "dim", "depth", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {"family": self.family, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (as written by :meth:`to_dict`); unknown keys are an error."""
        data = dict(data)
        family = data.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"config is for family {family!r}, not {cls.family!r}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} for family {cls.family!r}; "
                f"accepted: {', '.join(cls.field_names())}"
            )
        hints = typing.get_type_hints(cls)
        fixed = {k: _from_json_value(hints[k], v) for k, v in data.items()}
        return cls(**fixed)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; lists become tuples (a run's saved ``--set`` values come
        back from JSON as lists)."""
        return dataclasses.replace(self, **{k: _from_json_value(Any, v) for k, v in changes.items()})

    @classmethod
    def check_keys(cls, keys) -> None:
        """Refuse names that are not fields of this config, listing the accepted ones."""
        unknown = sorted(set(keys) - set(cls.field_names()))
        if unknown:
            names = ", ".join(map(repr, unknown))
            raise ValueError(
                f"unknown model key {names} for family {cls.family!r}; "
                f"accepted: {', '.join(cls.field_names())}"
            )

    @classmethod
    def parse_setting(cls, text: str) -> tuple[str, Any]:
        """Parse ``key=value`` against the field's type (the CLI's ``--set``)."""
        if "=" not in text:
            raise ValueError(f"--set expects key=value, got {text!r}")
        key, raw = text.split("=", 1)
        key = key.strip().replace("-", "_")
        cls.check_keys([key])
        hint = typing.get_type_hints(cls)[key]
        try:
            return key, parse_typed(hint, raw.strip())
        except ValueError as err:
            raise ValueError(f"bad value for {key!r}: {err}") from None


def _is_optional(hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def parse_typed(hint: Any, raw: str) -> Any:
    """Turn command-line text into a value of type ``hint`` (int, float, bool, str, tuples,
    literals, ``X | None``). Raises ValueError with the accepted form."""
    optional, inner = _is_optional(hint)
    if optional and raw.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(inner)
    if inner is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if inner is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if inner is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if inner is str:
        return raw
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if raw not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {raw!r}")
        return raw
    if origin is tuple:
        args = typing.get_args(inner)
        item = args[0] if args else str
        text = raw.strip("()[] ")
        parts = [p for p in text.split(",") if p.strip()]
        return tuple(parse_typed(item, p.strip()) for p in parts)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(inner):
            if option is type(None):
                continue
            try:
                return parse_typed(option, raw)
            except ValueError:
                continue
        raise ValueError(f"expected {inner}, got {raw!r}")
    raise ValueError(f"cannot parse a value of type {inner} from the command line")


def _from_json_value(hint: Any, value: Any) -> Any:
    """JSON has lists where the config has tuples; convert back."""
    if isinstance(value, list):
        return tuple(_from_json_value(Any, v) for v in value)
    return value
