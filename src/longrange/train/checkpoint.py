"""Atomic files and the resumable trainer state.

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed
over the target, so a killed process leaves either the old file or the new one, never half.
The trainer state is split into tensors (safetensors: optimizer moments, RNG states) and plain
values (JSON: step, schedule, sampler position, RNG states of Python and NumPy); no pickle.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle, tmp)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file owner-only; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda handle, _tmp: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_safetensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {what}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {what} {path}: {err}") from None


def read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"corrupt {what} {path}: {err}") from None


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
