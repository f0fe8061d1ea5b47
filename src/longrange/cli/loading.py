"""Finding what a command works on: the device, a model directory, ``--set`` settings."""

from __future__ import annotations

import math
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from longrange.models.base import CONFIG_NAME, LongRangeLM
from longrange.models.registry import get_family


def model_settings(family: str, settings: list[str]) -> dict[str, Any]:
    cls = get_family(family).config_class
    out = {}
    for text in settings:
        key, value = cls.parse_setting(text)
        out[key] = value
    return out


KEEP_WEIGHTS_SET_HELP = (
    "change a model setting that keeps the weights, e.g. --set num_retrieved_memories=0 "
    "(memorizing with retrieval off)"
)


def load_model(path: str, device: str, settings: list[str] | None = None) -> LongRangeLM:
    """A run folder (its latest weights) or any model directory written by save_pretrained,
    with ``--set`` changes that keep the weights (e.g. num_retrieved_memories=0)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint")
    if not (p / CONFIG_NAME).is_file() and (p / "best" / CONFIG_NAME).is_file():
        p = p / "best"
    overrides = None
    if settings:
        from longrange.atomic import read_json

        data = read_json(p / CONFIG_NAME, "model config")
        if not isinstance(data, dict) or "family" not in data:
            raise ValueError(f"{p / CONFIG_NAME} is not a longrange config (no 'family' key)")
        overrides = model_settings(data["family"], settings)
    return LongRangeLM.from_pretrained(p, map_location=device, overrides=overrides)


def pick_device(name: str) -> str:
    from longrange.train.distributed import pick_device as pick

    return str(pick(name))


def use_cpu_cache(device: str, wanted: bool, command: str) -> None:
    """Put the CPU allocation cache (``longrange.cpu_cache``) in place for a CPU run unless
    ``--no-cpu-cache`` was given; where it cannot be built, say so in one line and go on
    with torch's allocator."""
    if not wanted or torch.device(device).type != "cpu":
        return
    from longrange import cpu_cache

    try:
        cpu_cache.enable()
    except cpu_cache.CacheUnavailable as err:
        note = f"longrange {command}: CPU allocation cache off ({err}); --no-cpu-cache hides this"
        print(note, file=sys.stderr)


def denormals_flushable(device: str, wanted: bool, command: str) -> bool:
    """Whether a run on ``device`` flushes subnormal numbers to zero on every thread of torch's
    pool (``longrange.ops.numerics``: a trained model's tiny attention weights and features
    otherwise make matmuls up to 100x slower): on CPU unless ``--keep-denormals`` was given,
    where the helper can be built; where it cannot, say so in one line."""
    if not wanted or torch.device(device).type != "cpu":
        return False
    from longrange.ops import numerics

    reason = numerics.flush_available()
    if reason is not None:
        note = f"longrange {command}: subnormal numbers kept ({reason}); --keep-denormals hides this"
        print(note, file=sys.stderr)
        return False
    return True


def flushed_denormals(device: str, wanted: bool, command: str) -> AbstractContextManager:
    """A block run with subnormal numbers flushed where :func:`denormals_flushable` says so."""
    from longrange.ops import numerics

    return numerics.flushed_denormals(device, denormals_flushable(device, wanted, command))


KEEP_DENORMALS_HELP = (
    "on CPU, keep subnormal numbers (default: flush them to zero on every thread, see longrange.ops.numerics)"
)


def check_number(flag: str, value: float | None, *, low: float, high: float | None = None, open_low=False):
    """Refuse NaN, inf and values outside [low, high] (or (low, high]) before any work."""
    if value is None:
        return
    inside = value > low if open_low else value >= low
    if not math.isfinite(value) or not inside or (high is not None and value > high):
        bound = f"({low}" if open_low else f"[{low}"
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{flag} must be a finite number in {bound}, {upper}, got {value}")


def int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
