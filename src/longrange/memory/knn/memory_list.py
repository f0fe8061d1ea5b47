"""``KNNMemoryList``: one kNN memory per memorizing layer, the reference's list with its helpers,
plus persistence: :meth:`KNNMemoryList.save` writes every memory and a small list file,
:meth:`KNNMemoryList.open_saved` re-opens a saved list as a new one in a fresh folder (how a
model state holding memories loads, ``models.state.State.load``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from longrange.atomic import atomic_write_json, read_json
from longrange.checks import positive_int
from longrange.memory.knn.memory import (
    DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY,
    SAVE_META,
    KNNMemory,
    row_indices,
)
from longrange.memory.knn.store import make_memory_directory, prepare_directory, remove_memory_directory

LIST_META = "knn.memories.json"
LIST_FORMAT = "longrange-knn-memory-list-1"


class KNNMemoryList(list):
    """One :class:`KNNMemory` per memorizing layer, with the reference's helpers."""

    @classmethod
    def create_memories(
        cls,
        *,
        batch_size: int,
        num_memory_layers: int,
        memories_directory: str | os.PathLike | None = DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY,
    ):
        """Return ``fn(*args, **kwargs)`` building ``num_memory_layers`` memories of
        ``batch_size`` rows (``KNNMemory`` arguments) in ``memories_directory`` (None: a fresh
        temporary directory, removed by :meth:`cleanup`)."""
        positive_int("batch_size", batch_size)
        if not isinstance(num_memory_layers, int) or num_memory_layers < 0:
            raise ValueError(f"num_memory_layers must be a non-negative integer, got {num_memory_layers!r}")
        if memories_directory is None:
            directory, owned = make_memory_directory(), True
        else:
            directory, owned = prepare_directory(memories_directory), False

        def inner(*args, **kwargs) -> KNNMemoryList:
            kwargs.setdefault("remove_directory", owned)
            memories = cls()
            try:
                for layer in range(num_memory_layers):
                    memories.append(
                        KNNMemory(
                            *args,
                            num_indices=batch_size,
                            memmap_filename=directory / f"knn.memory.layer.{layer + 1}.memmap",
                            **kwargs,
                        )
                    )
            except BaseException:
                memories.cleanup()
                if kwargs["remove_directory"]:
                    shutil.rmtree(directory, ignore_errors=True)
                raise
            if kwargs["remove_directory"] and not memories:
                remove_memory_directory(directory)
            return memories

        return inner

    @property
    def num_indices(self) -> int | None:
        return self[0].num_indices if self else None

    @contextmanager
    def at_batch_indices(self, indices: Iterable[int]):
        indices = list(indices)
        with contextlib.ExitStack() as stack:
            for memory in self:
                stack.enter_context(memory.at_batch_indices(indices))
            yield self

    def clear_memory(
        self, batch_indices: int | Sequence[int] | None = None, memory_indices: Sequence[int] | None = None
    ) -> None:
        """Clear the given rows (all when None) of the given memories (all when None)."""
        chosen = (
            range(len(self))
            if memory_indices is None
            else row_indices("memory_indices", memory_indices, len(self))
        )
        for i in chosen:
            self[i].clear(batch_indices)

    def save(self, directory: str | os.PathLike) -> None:
        """Write every memory into ``directory/layer<i>`` and a list of them beside."""
        target = prepare_directory(directory)
        (target / LIST_META).unlink(missing_ok=True)  # written last: a half save is no saved list
        for i, memory in enumerate(self):
            memory.save(target / f"layer{i + 1}")
        # where the memories' own folder lives: a re-opened copy goes beside it
        home = next((str(m.directory.parent) for m in self if m.owns_directory), None)
        atomic_write_json(target / LIST_META, {"format": LIST_FORMAT, "memories": len(self), "home": home})

    def load(self, directory: str | os.PathLike) -> None:
        for i, memory in enumerate(self):
            memory.load(Path(directory) / f"layer{i + 1}")

    @classmethod
    def open_saved(
        cls, directory: str | os.PathLike, device: torch.device | str | None = None
    ) -> KNNMemoryList:
        """A new list with the contents saved in ``directory`` by :meth:`save`, in a fresh
        folder (beside the saved list's own folder when that still exists, else in the
        system temp directory); ValueError when the directory holds no saved list."""
        source = Path(directory)
        meta = read_json(source / LIST_META, "kNN memory list")
        try:
            count, home = int(meta["memories"]), meta["home"]
            if meta.get("format") != LIST_FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}")
            saved = [read_json(source / f"layer{i + 1}" / SAVE_META, "kNN memory") for i in range(count)]
            shapes = {tuple(m["shape"]) for m in saved}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"corrupt kNN memory list in {str(source)!r}: {err}") from None
        if not count:
            return cls()
        if len(shapes) != 1:
            raise ValueError(f"corrupt kNN memory list in {str(source)!r}: memories of shapes {shapes}")
        rows, capacity, _, dim = shapes.pop()
        usable = home is not None and os.path.isdir(home) and os.access(home, os.W_OK | os.X_OK)
        folder = make_memory_directory(home if usable else None)
        first = saved[0]
        memories = cls.create_memories(batch_size=rows, num_memory_layers=count, memories_directory=folder)(
            dim=dim,
            max_memories=capacity,
            multiprocessing=bool(first.get("multiprocessing", False)),
            backend=first["backend"],
            index=first["index"],
            index_options=first.get("index_options") or None,
            device=device,
            remove_directory=True,
        )
        try:
            memories.load(source)
        except BaseException:
            memories.cleanup()
            raise
        return memories

    def cleanup(self) -> None:
        """Close every memory: their files (and a temporary directory) are removed."""
        for memory in self:
            memory.close()

    close = cleanup
