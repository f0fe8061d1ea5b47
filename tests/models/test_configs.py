"""Every family's config refuses bad values the same way, driven by the field annotations."""

import dataclasses
import math
import typing

import pytest

from longrange.models.config import Rule, _split_annotation
from longrange.models.registry import FAMILIES, get_family, make_config

# A bad value for each rule text, and for each plain type.
BAD_BY_RULE = {
    "a positive integer": [0, -2],
    "a non-negative integer": [-1],
    "a positive number": [0.0, -1.0, math.nan],
    "a number >= 0": [-1e-4, math.nan],
    "a number in [0, 1)": [1.0, -0.1],
}
BAD_BY_TYPE = {bool: [1, "yes"], int: [1.5, True], float: ["x", math.inf], str: [3]}


def _cases():
    for family in FAMILIES:
        config_class = get_family(family).config_class
        hints = typing.get_type_hints(config_class, include_extras=True)
        for f in dataclasses.fields(config_class):
            kind, rules, _ = _split_annotation(hints[f.name])
            bad = list(BAD_BY_TYPE.get(kind, []))
            for rule in rules:
                if isinstance(rule.what, str):
                    bad += BAD_BY_RULE.get(rule.what, [])
            if typing.get_origin(kind) is typing.Literal:
                bad.append("no-such-choice")
            for value in bad:
                yield pytest.param(family, f.name, value, id=f"{family}-{f.name}-{value!r}")


@pytest.mark.parametrize("family, field, value", list(_cases()))
def test_bad_values_are_refused_naming_the_field(family, field, value):
    with pytest.raises(ValueError, match=field):
        make_config(family, "tiny", **{field: value})


def _rules(config_class) -> dict[str, tuple]:
    hints = typing.get_type_hints(config_class, include_extras=True)
    out = {}
    for name, hint in hints.items():
        kind, rules, _ = _split_annotation(hint)
        # choices differ by family (each its own backends); the kind of check must not
        del kind  # the type may differ (a count, or one per layer; 4 or 4.0): the range must not
        out[name] = tuple(_range(r) for r in rules if isinstance(r, Rule))
    return out


def _range(rule: Rule) -> str:
    """A rule's range, whatever the type it is written for ("custom" for a rule that depends
    on the config, which matches any range)."""
    if not isinstance(rule.what, str):
        return "custom"
    return rule.what.replace("integer", "number")


def _alike(a: tuple, b: tuple) -> bool:
    return a == b or (bool(a) and bool(b) and ("custom" in a or "custom" in b))


def test_a_field_shared_by_families_is_checked_alike():
    seen: dict[str, tuple[str, tuple]] = {}
    differ = []
    for family in FAMILIES:
        for name, rule in _rules(get_family(family).config_class).items():
            if name in seen and not _alike(seen[name][1], rule):
                differ.append(f"{name}: {family} {rule} vs {seen[name][0]} {seen[name][1]}")
            seen.setdefault(name, (family, rule))
    assert not differ, "\n".join(differ)


def test_performer_feature_eps_is_refused_below_zero():
    # a negative epsilon reached the non-causal features and failed there, unnamed, at the first
    # forward (and a causal model ignored it)
    with pytest.raises(ValueError, match="feature_eps must be a number >= 0"):
        make_config("performer", "tiny", feature_eps=-1e-4)
    assert make_config("performer", "tiny", feature_eps=0.0).feature_eps == 0.0
