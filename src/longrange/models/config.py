"""Config dataclasses: one per family, keyword-only, checked from their annotations, JSON
round-trip and typed ``--set`` parsing.

A field's annotation is its check (docs/ARCHITECTURE.md, "Configs"): ``int``, ``float``,
``bool``, ``str``, ``Literal[...]`` and ``tuple[int, ...]`` are checked by type and choice,
``X | None`` also accepts None, and ``typing.Annotated`` adds a :class:`Rule` for ranges
(:data:`PositiveInt`, :data:`NonNegativeInt`, :data:`Probability`, :data:`PositiveFloat`,
:data:`NonNegativeFloat`, :data:`LayerNumbers`). A family's :meth:`ModelConfig.check` holds
only what relates two fields. Every failure is a ValueError that names the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal


@dataclass(frozen=True)
class Rule:
    """A range check attached to a field with ``Annotated``: ``test(value, config)`` and the
    text of what the value must be (a string, or a function of the config)."""

    what: str | Callable[[Any], str]
    test: Callable[[Any, Any], bool]

    def describe(self, config: Any) -> str:
        return self.what(config) if callable(self.what) else self.what


PositiveInt = Annotated[int, Rule("a positive integer", lambda v, c: v > 0)]
NonNegativeInt = Annotated[int, Rule("a non-negative integer", lambda v, c: v >= 0)]
PositiveFloat = Annotated[float, Rule("a positive number", lambda v, c: v > 0)]
NonNegativeFloat = Annotated[float, Rule("a number >= 0", lambda v, c: v >= 0)]
Probability = Annotated[float, Rule("a number in [0, 1)", lambda v, c: 0 <= v < 1)]
LayerNumbers = Annotated[
    tuple[int, ...],
    Rule(
        lambda c: f"a tuple of layer numbers from 1 to the depth {c.depth}",
        lambda v, c: all(1 <= i <= c.depth for i in v),
    ),
]
# The benchmark size every family's ``bench`` preset shares.
BENCH_SIZE: dict[str, int] = {"dim": 256, "depth": 4, "heads": 4}

# Attention recomputation (routing, sinkhorn): a config's ``recompute_attention`` field.
# "auto" recomputes when a training call holds more than RECOMPUTE_POSITIONS positions
# (batch x length), where the attention activations would dominate the memory.
RECOMPUTE_POSITIONS = 16384
RecomputeRule = Literal["auto", "always", "never"]


def recomputes(rule: str, positions: int) -> bool:
    """Whether a call of ``positions`` (batch x length) recomputes its attention under ``rule``."""
    if rule == "auto":
        return positions > RECOMPUTE_POSITIONS
    return rule == "always"


def check_known(
    names: Iterable[str],
    accepted: Iterable[str],
    noun: str,
    where: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """Refuse names outside ``accepted``, listing the accepted ones (the one unknown-key check
    of the library: configs, ``--set``, overrides and the reference-compatible keywords)."""
    accepted = list(accepted)
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise error(f"unknown {noun} {listed}{where}; accepted: {', '.join(accepted)}")


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every family shares. Families subclass it and add their own."""

    family: ClassVar[str] = ""

    vocab_size: PositiveInt = 256
    max_seq_len: PositiveInt = 1024
    dim: PositiveInt = 256
    depth: PositiveInt = 4
    heads: PositiveInt = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field against its annotation, then :meth:`check`; raise ValueError
        naming the first bad field."""
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fixed = _check_field(f.name, hints[f.name], value, self)
            if fixed is not value:
                setattr(self, f.name, fixed)
        self.check()

    def check(self) -> None:
        """Constraints that relate two or more fields (families extend it)."""
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
        check_known(data, cls.field_names(), "config key(s)", f" for family {cls.family!r}")
        return cls(**{k: _from_json_value(v) for k, v in data.items()})

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; lists become tuples (a run's saved ``--set`` values come
        back from JSON as lists)."""
        return dataclasses.replace(self, **{k: _from_json_value(v) for k, v in changes.items()})

    @classmethod
    def check_keys(cls, keys: Iterable[str]) -> None:
        """Refuse names that are not fields of this config, listing the accepted ones."""
        check_known(keys, cls.field_names(), "model key", f" for family {cls.family!r}")

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


# --- checking a field against its annotation ----------------------------------------------
def _split_annotation(hint: Any) -> tuple[Any, list[Rule], bool]:
    """hint -> (the plain type, its rules, whether None is accepted)."""
    rules: list[Rule] = []
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rules = [r for r in extras if isinstance(r, Rule)]
    return hint, rules, optional


def _describe(kind: Any) -> str:
    if kind is bool:
        return "True or False"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is str:
        return "a string"
    if typing.get_origin(kind) is Literal:
        choices = [repr(c) for c in typing.get_args(kind)]
        return " or ".join(choices) if len(choices) <= 2 else f"one of {', '.join(choices)}"
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a tuple of {plural.get(item, _describe(item))}"
    return str(kind)


def _matches(kind: Any, value: Any) -> bool:
    if kind is Any:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str)
    origin = typing.get_origin(kind)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(kind))
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, tuple) and all(_matches(item, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(option, value) for option in typing.get_args(kind))
    return isinstance(value, kind) if isinstance(kind, type) else True


def _check_field(name: str, hint: Any, value: Any, config: Any) -> Any:
    """Check one field; return the value (a list or a lone int given for a tuple field
    becomes a tuple)."""
    kind, rules, optional = _split_annotation(hint)
    if value is None and optional:
        return value
    if typing.get_origin(kind) is tuple and isinstance(value, (list, int)) and not isinstance(value, bool):
        value = tuple(value) if isinstance(value, list) else (value,)
    if not _matches(kind, value) or not all(r.test(value, config) for r in rules):
        text = rules[-1].describe(config) if rules else _describe(kind)
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{text}, got {value!r}")
    return value


# --- command-line values --------------------------------------------------------------------
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
    if origin is Literal:
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


def _from_json_value(value: Any) -> Any:
    """JSON has lists where the config has tuples; convert back."""
    if isinstance(value, list):
        return tuple(_from_json_value(v) for v in value)
    return value
