"""The resumable trainer state, written with :mod:`longrange.atomic`.

The trainer state is split into tensors (safetensors: optimizer moments, RNG states) and plain
values (JSON: step, schedule, sampler position, RNG states of Python and NumPy); no pickle.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from longrange.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_safetensors,
    read_json,
    read_safetensors,
)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_safetensors",
    "load_trainer_state",
    "read_json",
    "read_safetensors",
    "save_trainer_state",
]

TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"


# --- optimizer and RNG state without pickle ------------------------------------------------
def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        plain_slots = {}
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain_slots[name] = value
        plain["state"][str(idx)] = plain_slots
    return tensors, plain


def optimizer_from_flat(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = plain["numpy"]
    np.random.set_state((npv[0], np.array(npv[1], dtype=np.uint32), *npv[2:]))


def save_trainer_state(directory: Path, optimizer_state: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write the optimizer, RNG states and ``extra`` (step, sampler, ...) into ``directory``."""
    opt_tensors, opt_plain = optimizer_to_flat(optimizer_state)
    rng_tensors, rng_plain = capture_rng()
    atomic_write_safetensors(Path(directory) / TRAINER_TENSORS, {**opt_tensors, **rng_tensors})
    atomic_write_json(Path(directory) / TRAINER_JSON, {"optimizer": opt_plain, "rng": rng_plain, **extra})


def load_trainer_state(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """Return (optimizer state dict, the JSON document, tensors); RNG is restored by the caller."""
    tensors = read_safetensors(Path(directory) / TRAINER_TENSORS, "trainer state")
    plain = read_json(Path(directory) / TRAINER_JSON, "trainer state")
    if "optimizer" not in plain or "rng" not in plain or "step" not in plain:
        raise ValueError(f"corrupt trainer state in {directory}: missing keys")
    return optimizer_from_flat(tensors, plain["optimizer"]), plain, tensors
