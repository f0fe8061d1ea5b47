"""How the reference-named classes initialise their weights, and how to measure it.

A drop-in class must train like its reference under the reference's own training script, and
the first steps of a run depend on the initial scale of every weight (the memorizing
reference's enwik8 script, run on a model whose token embedding was drawn from N(0, 0.02)
rather than PyTorch's N(0, 1), jumped above the loss of a uniform guess at its third step
where the reference's loss fell). So the reference-named classes start where their
reference starts, while the native families (``create_model``, the ``*LM`` config classes)
keep the initialisation that suits them (``modules/init.py``):

- :func:`reset_torch_defaults` redraws every plain PyTorch layer (``nn.Linear``,
  ``nn.Embedding``, ``nn.LayerNorm``) with PyTorch's own initialisation, which is what the
  block-recurrent and memorizing references leave them at; a family's ``compat.py`` then
  redraws the few parameters its reference draws in its own way;
- :func:`init_statistics` summarises a model's weights per parameter group (the parameter
  name with the layer numbers replaced by ``*``) and :func:`compare_init` compares two such
  summaries, so that a model can be checked against its reference's initialisation (the
  reference's weights converted into the same class with ``longrange.convert.load_reference``).

The routing, sinkhorn and performer families already initialise like their references (their
layers keep PyTorch's defaults and the references' few explicit draws), so their
reference-named classes need nothing from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from longrange.convert import load_reference

# the layers whose own ``reset_parameters`` is PyTorch's default initialisation
TORCH_LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


def reset_torch_defaults(module: nn.Module) -> nn.Module:
    """Redraw every ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm`` in ``module`` (their
    subclasses included) with PyTorch's default initialisation; returns ``module``."""
    for m in module.modules():
        if isinstance(m, TORCH_LAYERS):
            m.reset_parameters()
    return module


@dataclass(frozen=True)
class GroupStatistics:
    """Mean and standard deviation of the values of one parameter group (``count`` values)."""

    count: int
    mean: float
    std: float


def group_name(name: str) -> str:
    """``layers.3.to_q.weight`` -> ``layers.*.to_q.weight``."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def init_statistics(model: nn.Module) -> dict[str, GroupStatistics]:
    """Parameter group -> statistics of its values (see the module docstring)."""
    values: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        values.setdefault(group_name(name), []).append(p.detach().flatten().double())
    out = {}
    for group, parts in values.items():
        flat = torch.cat(parts)
        std = float(flat.std()) if flat.numel() > 1 else 0.0
        out[group] = GroupStatistics(flat.numel(), float(flat.mean()), std)
    return out


def compare_init(
    ours: dict[str, GroupStatistics], theirs: dict[str, GroupStatistics], rtol: float = 0.1
) -> list[str]:
    """The groups whose statistics differ (empty when none does), as readable lines.

    Two draws of the same distribution differ by chance, and by more in small groups: a
    group's standard deviations must agree within ``rtol`` or within four standard errors of
    their difference (``4 / sqrt(count)`` relative, for normal draws), whichever is wider;
    its means within ``rtol`` of the standard deviation plus four standard errors. A group
    of constants (norm gains, zero gates) must hold the same constant."""
    problems = []
    for group in sorted(set(ours) | set(theirs)):
        if group not in ours or group not in theirs:
            problems.append(f"{group}: only in {'ours' if group in ours else 'theirs'}")
            continue
        a, b = ours[group], theirs[group]
        n = min(a.count, b.count)
        scale = max(a.std, b.std)
        if scale == 0.0:
            if abs(a.mean - b.mean) > 1e-6 * max(1.0, abs(b.mean)):
                problems.append(f"{group}: constant {a.mean:.4g}, theirs {b.mean:.4g}")
            continue
        spread = max(rtol, 4.0 / n**0.5)
        if abs(a.std - b.std) > spread * b.std:
            problems.append(f"{group}: std {a.std:.4g}, theirs {b.std:.4g} (n={n})")
        if abs(a.mean - b.mean) > rtol * scale + 4.0 * scale * (2.0 / n) ** 0.5:
            problems.append(f"{group}: mean {a.mean:.4g}, theirs {b.mean:.4g} (std {scale:.4g}, n={n})")
    return problems


def init_mismatches(
    build: Callable[[], nn.Module],
    build_reference: Callable[[], nn.Module],
    *,
    seed: int = 0,
    rtol: float = 0.1,
) -> list[str]:
    """:func:`compare_init` of a model from ``build()`` against a reference from
    ``build_reference()`` (both drawn after ``torch.manual_seed(seed)``), the reference's
    weights converted into a second ``build()`` so that the groups have the same names."""
    torch.manual_seed(seed)
    reference = build_reference()
    torch.manual_seed(seed)
    ours = build()
    converted = load_reference(build(), reference.state_dict())
    return compare_init(init_statistics(ours), init_statistics(converted), rtol)


__all__ = [
    "TORCH_LAYERS",
    "GroupStatistics",
    "compare_init",
    "group_name",
    "init_mismatches",
    "init_statistics",
    "reset_torch_defaults",
]
