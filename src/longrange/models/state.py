"""The one state shape every family carries from one call to the next.

A :class:`State` holds what a model needs to continue a sequence (docs/ARCHITECTURE.md,
"State"): the number of positions it has seen, one dict of named entries per layer (KV
caches, running sums, XL windows, recurrent states, ...), and a dict of entries shared by the
layers (the conditioning ``context`` of a decoder, kNN memories, masks of an XL window). The
same object serves incremental decoding (``prefill`` / ``step``) and, for the families that
carry state across training segments, ``forward_lm(state=...)``.

Entries are tensors, plain values (int, float, bool, str, None), lists / tuples / dicts of
entries, dataclasses registered with :func:`state_entry`, or objects registered with
:func:`state_files` that persist themselves into a folder (the kNN memories). That keeps a
state detachable and savable without pickle: :meth:`State.save` writes the tensors as
safetensors and the rest as JSON, :meth:`State.load` rebuilds only registered types.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from longrange.atomic import (
    atomic_write_json,
    atomic_write_safetensors,
    fsync_directory,
    read_json,
    read_safetensors,
)

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_ENTRY_TYPES: dict[str, type] = {}
_FILE_TYPES: dict[str, Callable[[Path, torch.device], Any]] = {}


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(table: dict, cls: type, value: Any) -> None:
    name = _type_name(cls)
    if table.get(name, value) is not value:
        raise ValueError(f"{name} is registered twice as a state entry")
    table[name] = value


def state_entry(cls: type) -> type:
    """Register a dataclass as a state entry (so :meth:`State.load` may rebuild it)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass to be a state entry")
    _register(_ENTRY_TYPES, cls, cls)
    return cls


def state_files(loader: Callable[[Path, torch.device], Any]):
    """Register a class whose instances persist as files: ``obj.save(directory)`` writes them
    and ``loader(directory, device)`` reads them back."""

    def register(cls: type) -> type:
        _register(_FILE_TYPES, cls, loader)
        return cls

    return register


@dataclass
class State:
    """What a model carries from one call to the next (see the module docstring).

    ``batch_size``: rows; ``layers[i]``: layer i's entries; ``position``: positions seen;
    ``shared``: entries that span layers.
    """

    batch_size: int
    layers: list[dict[str, Any]]
    position: int = 0
    shared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch_size: int, num_layers: int, **shared: Any) -> State:
        return cls(batch_size, [{} for _ in range(num_layers)], 0, dict(shared))

    def check_batch(self, batch: int) -> None:
        if batch != self.batch_size:
            raise ValueError(f"the state holds {self.batch_size} batch rows, the tokens have {batch}")

    def detach(self) -> State:
        """A state with the same entries cut from the autograd graph."""
        return State(self.batch_size, _map(self.layers, _detach), self.position, _map(self.shared, _detach))

    def close(self) -> None:
        """Release what lives outside Python (kNN memory files); the state is unusable after."""
        for leaf in _leaves([self.layers, self.shared]):
            close = getattr(leaf, "close", None)
            if callable(close) and not isinstance(leaf, Tensor):
                close()

    def checked(self, check: Callable[[State], None]) -> State:
        """This state once ``check`` accepts it (e.g. a model's check of a loaded state); a
        refused state is closed first, so that its kNN memory files go at once rather than
        whenever the collector finds it."""
        try:
            check(self)
        except BaseException:
            self.close()
            raise
        return self

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the state into ``directory`` (tensors as safetensors, the rest as JSON,
        file-backed entries in sub-folders)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # state.json is written last and names everything else: drop an earlier save's first,
        # so a save that dies half way leaves a folder that refuses to load, never old entries
        # beside new files
        (directory / STATE_JSON).unlink(missing_ok=True)
        fsync_directory(directory)
        tensors: dict[str, Tensor] = {}
        tree = _encode({"layers": self.layers, "shared": self.shared}, "s", tensors, directory, [0])
        atomic_write_safetensors(directory / STATE_TENSORS, tensors)
        doc = {"batch_size": self.batch_size, "position": self.position, "tree": tree}
        atomic_write_json(directory / STATE_JSON, doc)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> State:
        """Read a state written by :meth:`save`; FileNotFoundError (naming the file) when it is
        missing, ValueError when it is corrupt."""
        directory = Path(directory)
        doc = read_json(directory / STATE_JSON, "model state")
        tensors = read_safetensors(directory / STATE_TENSORS, "model state")
        try:
            tree = _decode(doc["tree"], tensors, directory, torch.device(device))
            return cls(int(doc["batch_size"]), tree["layers"], int(doc["position"]), tree["shared"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"corrupt model state in {directory}: {err}") from None


def _detach(leaf: Any) -> Any:
    if isinstance(leaf, Tensor):
        return leaf.detach()
    detach = getattr(leaf, "detach", None)
    return detach() if callable(detach) else leaf


def _is_files(tree: Any) -> bool:
    """A file-backed entry: one leaf, even when it is a list (a list of kNN memories)."""
    return _type_name(type(tree)) in _FILE_TYPES


def _map(tree: Any, fn: Callable[[Any], Any]) -> Any:
    if _is_files(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_map(v, fn) for v in tree)
    return fn(tree)


def _leaves(tree: Any):
    if _is_files(tree):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _encode(tree: Any, path: str, tensors: dict[str, Tensor], directory: Path, counter: list[int]) -> Any:
    if isinstance(tree, Tensor):
        # a copy of its own: entries may share storage (safetensors refuses shared tensors)
        tensors[path] = tree.detach().cpu().contiguous().clone()
        return {"tensor": path}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    if _is_files(tree):
        counter[0] += 1
        folder = f"files-{counter[0]}"
        tree.save(directory / folder)
        return {"files": _type_name(type(tree)), "folder": folder}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError(f"state dict keys must be strings at {path}")
        return {"dict": {k: _encode(v, f"{path}.{k}", tensors, directory, counter) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [_encode(v, f"{path}.{i}", tensors, directory, counter) for i, v in enumerate(tree)]}
    name = _type_name(type(tree))
    if name in _ENTRY_TYPES and dataclasses.is_dataclass(tree):
        fields = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
        return {"entry": name, "fields": _encode(fields, path, tensors, directory, counter)}
    raise TypeError(f"cannot save a state entry of type {name} at {path}; register it with state_entry")


def _decode(node: Any, tensors: dict[str, Tensor], directory: Path, device: torch.device) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]].to(device)
    if "value" in node:
        return node["value"]
    if "dict" in node:
        return {k: _decode(v, tensors, directory, device) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(v, tensors, directory, device) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors, directory, device) for v in node["tuple"])
    if "entry" in node:
        cls = _ENTRY_TYPES.get(node["entry"])
        if cls is None:
            raise ValueError(f"unknown state entry type {node['entry']!r}")
        return cls(**_decode(node["fields"], tensors, directory, device))
    if "files" in node:
        loader = _FILE_TYPES.get(node["files"])
        if loader is None:
            raise ValueError(f"unknown file-backed state entry {node['files']!r}")
        return loader(directory / node["folder"], device)
    raise ValueError(f"unreadable state node {json.dumps(node)[:80]}")
