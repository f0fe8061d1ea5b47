"""Reference keyword tables: how a reference-compatible class turns its keywords into a config.

Every compat class (``PerformerLM``, ``RoutingTransformerLM``, ...) declares one
:class:`KeywordTable`: the reference's keywords with their defaults, the ones it requires,
the reference names that differ from longrange's config fields, and the longrange-only
keywords it accepts beside them. :meth:`KeywordTable.parse` is the whole constructor logic:
refuse unknown keywords (TypeError, as Python does, listing the accepted ones), insist on the
required ones, fill the defaults, rename. Encoder-decoders split ``enc_`` / ``dec_`` keywords
with :func:`split_prefixed`.

``aliases`` are misspellings that a reference's own documentation uses (performer's README
passes ``tie_embedding`` for ``tie_embed``): a script copied from it runs, with a warning that
names the keyword's real spelling (:func:`resolve_aliases`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from longrange.models.config import check_known


@dataclass(frozen=True)
class KeywordTable:
    """One reference class's keywords (see the module docstring)."""

    owner: str
    defaults: Mapping[str, Any]
    required: tuple[str, ...] = ()
    renames: Mapping[str, str] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def for_config(
        cls,
        owner: str,
        defaults: Mapping[str, Any],
        config_class: Any,
        *,
        required: tuple[str, ...] = (),
        renames: Mapping[str, str] | None = None,
    ) -> KeywordTable:
        """A table whose extras are the fields of ``config_class`` that the reference's
        keywords (and the fields they rename to) leave out."""
        renames = dict(renames or {})
        named = {*defaults, *required, *renames.values()}
        extras = tuple(name for name in config_class.field_names() if name not in named)
        return cls(owner, defaults, required, renames, extras)

    @property
    def accepted(self) -> list[str]:
        return [*self.required, *self.defaults, *self.extras]

    def parse(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The config fields for ``given`` keywords: defaults filled, reference names renamed;
        longrange-only extras appear only when given."""
        given = resolve_aliases(given, self.aliases, self.owner)
        check_known(given, self.accepted, "keyword(s)", f" for {self.owner}", TypeError)
        missing = [name for name in self.required if given.get(name) is None]
        if missing:
            raise TypeError(f"{self.owner} needs the keyword(s) {missing}")
        merged = {**self.defaults, **given}
        return {self.renames.get(k, k): v for k, v in merged.items()}


def resolve_aliases(
    given: Mapping[str, Any], aliases: Mapping[str, str], owner: str, *, stacklevel: int = 5
) -> dict[str, Any]:
    """``given`` with each alias renamed to the keyword it stands for, warning once per alias
    (a UserWarning naming the right spelling, reported ``stacklevel`` frames up: the user's
    call through a compat constructor); TypeError when both spellings are given."""
    out = dict(given)
    for alias, name in aliases.items():
        if alias not in out:
            continue
        if name in out:
            raise TypeError(f"{owner} got both {alias} and {name}; pass only {name}")
        warnings.warn(
            f"{owner}: {alias!r} is taken as {name!r} (the keyword's name); please write {name}",
            UserWarning,
            stacklevel=stacklevel,
        )
        out[name] = out.pop(alias)
    return out


def split_prefixed(
    kwargs: Mapping[str, Any], prefixes: tuple[str, str] = ("enc_", "dec_")
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """{enc_x: 1, dec_y: 2, z: 3} -> ({x: 1}, {y: 2}, {z: 3})."""
    first, second = prefixes
    a = {k[len(first) :]: v for k, v in kwargs.items() if k.startswith(first)}
    b = {k[len(second) :]: v for k, v in kwargs.items() if k.startswith(second)}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(prefixes)}
    return a, b, rest
