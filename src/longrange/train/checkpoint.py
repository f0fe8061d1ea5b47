"""Training checkpoints: one folder per step, made complete under a temporary name and
published by one rename and one pointer file.

Under ``<run>/checkpoints/``::

    step-000120/                      one checkpoint (also a model directory from_pretrained reads)
      config.json, model.safetensors  the weights; the safetensors metadata names the step
      trainer_state.json/.safetensors optimizer moments, step, counters, best bpb, loss scale
      rank-0.json/.safetensors        process 0's sampler position and RNG states (one pair per process)
      state-0/                        process 0's carried state, for families that carry state
                                      across segments (model.save_state)
    latest.json                       the pointer: step, folder, world size, and the size and
                                      SHA-256 of every file of the folder

Writing: rank 0 makes ``step-000120.tmp/``; every process writes its rank files into it; rank
0 writes the rest, fsyncs, renames the folder to ``step-000120/`` and atomically replaces
``latest.json``. A process killed at any point leaves latest.json naming the previous complete
checkpoint. Reading checks every file against latest.json and that every file names the same
step, and refuses a set that does not agree. No pickle anywhere: tensors in safetensors,
everything else in JSON.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from longrange.atomic import (
    atomic_link_or_copy,
    atomic_write_json,
    file_digest,
    fsync_directory,
    json_bytes,
    read_json,
    read_safetensors,
    write_synced,
)
from longrange.models.base import CONFIG_NAME, FORMAT_TAG, WEIGHTS_NAME

CHECKPOINTS = "checkpoints"
POINTER = "latest.json"
POINTER_FORMAT = "longrange-checkpoint-1"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
STEP_FOLDER = re.compile(r"^step-(\d+)(\.tmp)?$")


def step_folder_name(step: int) -> str:
    return f"step-{step:06d}"


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


# --- writing ---------------------------------------------------------------------------------
def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """Rank 0: an empty staging folder ``checkpoints/step-N.tmp`` (a leftover of a killed
    save is removed first). The run folder is locked, so no other process writes here."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    staging = root / f"{step_folder_name(step)}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def write_rank_files(staging: Path, *, rank: int, step: int, sampler: dict, model, state: Any) -> None:
    """One process's part: sampler position, RNG states and the carried state."""
    rng_tensors, rng_plain = capture_rng()
    saves_state = bool(model.carries_state)
    if saves_state:
        folder = staging / f"state-{rank}"
        folder.mkdir()
        model.save_state(state, folder)
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                fsync_directory(path)
    write_synced(staging / f"rank-{rank}.safetensors", save(rng_tensors, metadata={"step": str(step)}))
    plain = {"step": step, "rank": rank, "sampler": sampler, "rng": rng_plain, "carried_state": saves_state}
    write_synced(staging / f"rank-{rank}.json", json_bytes(plain))


def write_shared_files(staging: Path, *, step: int, model, optimizer_state: dict, extra: dict) -> None:
    """Rank 0's part: the weights (a model directory) and the trainer state."""
    metadata = {"format": FORMAT_TAG, "step": str(step)}
    write_synced(staging / WEIGHTS_NAME, save(model.weights_for_saving(), metadata=metadata))
    write_synced(staging / CONFIG_NAME, json_bytes(model.config.to_dict()))
    opt_tensors, opt_plain = optimizer_to_flat(optimizer_state)
    write_synced(staging / TRAINER_TENSORS, save(opt_tensors, metadata={"step": str(step)}))
    write_synced(staging / TRAINER_JSON, json_bytes({**extra, "step": step, "optimizer": opt_plain}))


def publish_checkpoint(run_dir: Path, staging: Path, *, step: int, world_size: int) -> Path:
    """Rank 0: rename the complete staging folder into place, point latest.json at it, copy
    (hard-link) its weights to the run folder's top level and remove older checkpoints."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_folder_name(step)
    pointer = _read_pointer(root)
    if pointer is not None and pointer.get("folder") == final.name:
        raise ValueError(f"checkpoint {final} already exists and is the latest; it is never rewritten")
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            files[path.relative_to(staging).as_posix()] = file_digest(path)
    fsync_directory(staging)
    if final.exists():  # published by a killed process but never named by latest.json
        shutil.rmtree(final)
    staging.rename(final)
    fsync_directory(root)
    document = {"format": POINTER_FORMAT, "step": step, "folder": final.name, "world_size": world_size}
    atomic_write_json(root / POINTER, {**document, "files": files})
    atomic_link_or_copy(final / WEIGHTS_NAME, Path(run_dir) / WEIGHTS_NAME)
    atomic_link_or_copy(final / CONFIG_NAME, Path(run_dir) / CONFIG_NAME)
    remove_unpublished(run_dir, keep=final.name)
    return final


def remove_unpublished(run_dir: Path, *, keep: str) -> None:
    """Remove every step folder but ``keep`` (the one latest.json names): staging folders of
    killed saves and older checkpoints (the best weights live in best/)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_dir() and STEP_FOLDER.match(path.name) and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def _read_pointer(root: Path) -> dict | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        pointer = read_json(root / POINTER, "checkpoint pointer")
        if isinstance(pointer, dict):
            return pointer
    return None


# --- reading ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    folder: Path  # the step folder (a model directory)
    step: int
    world_size: int
    trainer: dict[str, Any]  # trainer_state.json
    optimizer_state: dict[str, Any]

    def rank_state(self, rank: int) -> tuple[dict[str, Any], dict[str, Tensor], Path | None]:
        """(rank-R.json, its RNG tensors, the carried-state folder or None) of process ``rank``."""
        plain = read_json(self.folder / f"rank-{rank}.json", "checkpoint rank state")
        tensors = read_safetensors(self.folder / f"rank-{rank}.safetensors", "checkpoint rank state")
        _agree(self.folder / f"rank-{rank}.json", plain.get("step"), self.step)
        state_dir = self.folder / f"state-{rank}"
        return plain, tensors, state_dir if plain.get("carried_state") else None


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint latest.json names, after checking that its files agree with each other
    and with latest.json; ValueError / FileNotFoundError otherwise."""
    root = Path(run_dir) / CHECKPOINTS
    if not (root / POINTER).is_file():
        if (Path(run_dir) / TRAINER_JSON).is_file():
            raise ValueError(
                f"{run_dir} was written by an older longrange (trainer state beside the weights, "
                f"no {CHECKPOINTS}/{POINTER}); it cannot be resumed exactly, start a new run"
            )
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint to resume from (no {CHECKPOINTS}/{POINTER}): "
            "the run stopped before its first checkpoint"
        )
    pointer = read_json(root / POINTER, "checkpoint pointer")
    keys = ("format", "step", "folder", "world_size", "files")
    if not isinstance(pointer, dict) or any(k not in pointer for k in keys):
        raise ValueError(f"corrupt checkpoint pointer {root / POINTER}: needs {', '.join(keys)}")
    if pointer["format"] != POINTER_FORMAT:
        raise ValueError(f"{root / POINTER}: unknown checkpoint format {pointer['format']!r}")
    _check_pointer_fields(root / POINTER, pointer)
    step = pointer["step"]
    folder = root / pointer["folder"]
    if pointer["folder"] != step_folder_name(step) or not folder.is_dir():
        raise ValueError(
            f"{root / POINTER} names step {step} in {pointer['folder']!r}, which is missing or misnamed"
        )
    for rel, expected in pointer["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ValueError(f"checkpoint {folder} is incomplete: {rel} is missing")
        found = file_digest(path)
        if found != expected:
            what = "size" if found["size"] != expected.get("size") else "SHA-256"
            raise ValueError(
                f"checkpoint {folder}: {rel} does not match {POINTER} ({what} differs); "
                "the checkpoint was changed after it was written"
            )
    for name in (WEIGHTS_NAME, CONFIG_NAME, TRAINER_JSON, TRAINER_TENSORS):
        if name not in pointer["files"]:
            raise ValueError(f"checkpoint {folder} does not list {name} in {POINTER}")
    trainer = read_json(folder / TRAINER_JSON, "trainer state")
    if not isinstance(trainer, dict) or "optimizer" not in trainer or "step" not in trainer:
        raise ValueError(f"corrupt trainer state in {folder}: missing keys")
    _agree(folder / TRAINER_JSON, trainer["step"], step)
    _agree(folder / WEIGHTS_NAME, _weights_step(folder / WEIGHTS_NAME), step)
    tensors = read_safetensors(folder / TRAINER_TENSORS, "trainer state")
    try:
        optimizer_state = optimizer_from_flat(tensors, trainer["optimizer"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"corrupt trainer state in {folder}: misshapen optimizer state ({err})") from None
    return Checkpoint(folder, step, pointer["world_size"], trainer, optimizer_state)


def _check_pointer_fields(path: Path, pointer: dict) -> None:
    """Refuse a pointer whose fields have the wrong types (a hand edit, another tool)."""

    def counts(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    digests = pointer["files"]
    listed = isinstance(digests, dict) and all(
        isinstance(rel, str)
        and isinstance(d, dict)
        and counts(d.get("size"), 0)
        and isinstance(d.get("sha256"), str)
        for rel, d in digests.items()
    )
    if not (counts(pointer["step"], 0) and counts(pointer["world_size"], 1)):
        problem = "step must be an integer >= 0 and world_size an integer >= 1"
    elif not isinstance(pointer["folder"], str):
        problem = "folder must be a folder name"
    elif not listed:
        problem = "files must map each file's path to its size and sha256"
    else:
        return
    raise ValueError(f"corrupt checkpoint pointer {path}: {problem}")


def _weights_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get("step")
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"corrupt weights file {path}: {err}") from None
    return None if value is None else int(value)


def _agree(path: Path, found: Any, step: int) -> None:
    if found is None or int(found) != step:
        raise ValueError(
            f"checkpoint files do not agree: {path} is from step {found}, latest.json says step {step}; "
            "refusing to resume from a mixed set"
        )
