"""The memory-mapped key/value store behind a kNN memory, and the directory lock.

Layout: one float32 array ``data`` of shape [2, R, M, D] in a file, R batch rows, M slots
per row: ``data[0, r, s]`` a key and ``data[1, r, s]`` its value. Keys (and values) of all
rows are one contiguous [R * M, D] table, so a retrieval gathers and sums the rows it needs
in one fused call (``embedding_bag``) without copying the table; ``db`` is the reference's
[R, M, 2, D] view of the same memory.

Entry ids. The n-th entry written to a row since the row was last cleared has id n and lives
in slot ``n mod M``; ``count[r]`` is the next id. An id is *alive* while
``count - M <= id < count``: once M newer entries have been written its slot holds another
pair. Writing is FIFO, so the oldest entries are the ones overwritten. The index backends key
their entries by these ids, so an id always names the (key, value) pair stored with it; the
reference keyed its faiss index by insertion position and lost that match at every reset.

One process holds a memory directory at a time: :func:`lock_directory` takes a file lock on
it (reference-counted inside the process, so a list of memories can share one directory) and
refuses a directory that another process holds. Within the process, one file backs one
memory: opening a file that is in use raises.

A folder made for a list of memories (:func:`make_memory_directory`) holds an ``OWNER`` file
with the creating process's id (decimal text), so that a later process can tell the folders
of processes that died without cleaning up; the last memory to close removes it with the
folder (:func:`remove_memory_directory`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor

from longrange.atomic import atomic_write_bytes

LOCK_NAME = ".knn.lock"
OWNER_NAME = "OWNER"
DIRECTORY_PREFIX = "longrange-knn-"

_registry_lock = threading.Lock()
_dir_locks: dict[Path, list] = {}  # resolved directory -> [FileLock, holders]
_files_in_use: set[Path] = set()


def prepare_directory(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed; ValueError when it cannot be created or written."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the kNN memory directory {str(path)!r}: {err}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the kNN memory directory {str(path)!r} is not a writable directory")
    return path.resolve()


def make_memory_directory(parent: str | os.PathLike | None = None) -> Path:
    """A fresh folder for memory files under ``parent`` (None: the system temp directory),
    marked with this process's id in ``OWNER``."""
    root = None if parent is None else prepare_directory(parent)
    directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=root)).resolve()
    atomic_write_bytes(directory / OWNER_NAME, str(os.getpid()).encode())
    return directory


def remove_memory_directory(directory: Path) -> None:
    """Remove a folder made by :func:`make_memory_directory` (or any folder) once nothing but
    its owner marker is left in it; a folder still in use stays."""
    with contextlib.suppress(OSError):
        if all(entry.name == OWNER_NAME for entry in directory.iterdir()):
            (directory / OWNER_NAME).unlink(missing_ok=True)
            directory.rmdir()


def lock_directory(directory: Path) -> None:
    """Take (or share, within this process) the lock on ``directory``."""
    directory = directory.resolve()
    with _registry_lock:
        held = _dir_locks.get(directory)
        if held is not None:
            held[1] += 1
            return
        lock = FileLock(str(directory / LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ValueError(
                f"the kNN memory directory {str(directory)!r} is locked by another process "
                f"({LOCK_NAME}); two processes cannot share one memory directory, give each its own"
            ) from None
        _dir_locks[directory] = [lock, 1]


def unlock_directory(directory: Path) -> None:
    """Drop one hold on ``directory``; the last one releases the lock and removes its file."""
    directory = directory.resolve()
    with _registry_lock:
        held = _dir_locks.get(directory)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _dir_locks[directory]
        lock_path = directory / LOCK_NAME
        # Unlink while still holding the lock, so no other process can lock the old inode.
        with contextlib.suppress(OSError):
            lock_path.unlink()
        held[0].release()


def claim_file(path: Path) -> None:
    path = path.resolve()
    with _registry_lock:
        if path in _files_in_use:
            raise ValueError(
                f"the kNN memory file {str(path)!r} is already used by another memory in this "
                "process; give each memory its own file or directory"
            )
        _files_in_use.add(path)


def release_file(path: Path) -> None:
    with _registry_lock:
        _files_in_use.discard(path.resolve())


class MemmapStore:
    """Keys and values of R rows x M slots in a memory-mapped file, with FIFO counters.

    ``data`` is the numpy memmap [2, R, M, D] (keys, then values); :meth:`keys` and
    :meth:`values` are torch views [R, M, D] of the same memory, ``db`` the [R, M, 2, D] view.
    """

    def __init__(self, path: Path, rows: int, capacity: int, dim: int) -> None:
        self.path, self.rows, self.capacity, self.dim = path, rows, capacity, dim
        self.shape = (rows, capacity, 2, dim)  # the reference's shape, as ``db`` shows it
        # mode w+ creates a sparse file: nothing is written until a slot is filled.
        self.data = np.memmap(path, mode="w+", dtype=np.float32, shape=(2, rows, capacity, dim))
        self.counts = np.zeros(rows, dtype=np.int64)
        self._view = torch.from_numpy(self.data)

    @property
    def db(self) -> np.ndarray:
        """[R, M, 2, D] view of the pairs (no copy)."""
        return self.data.transpose(1, 2, 0, 3)

    def keys(self) -> Tensor:
        """[R, M, D] float32 torch view of the keys (contiguous, no copy)."""
        return self._view[0]

    def values(self) -> Tensor:
        """[R, M, D] float32 torch view of the values (contiguous, no copy)."""
        return self._view[1]

    def filled(self, row: int) -> int:
        return int(min(self.counts[row], self.capacity))

    def alive_ids(self, row: int) -> np.ndarray:
        count = int(self.counts[row])
        return np.arange(max(0, count - self.capacity), count, dtype=np.int64)

    def write(self, row: int, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append ``entries`` [n, 2, D] to ``row``; return (ids written, ids evicted).

        When n exceeds M only the last M entries are stored (the others would be overwritten
        by them at once); their ids still count, so the FIFO order is the order given.
        """
        n = entries.shape[0]
        count = int(self.counts[row])
        kept = entries[-self.capacity :]
        first = count + n - kept.shape[0]
        ids = np.arange(first, count + n, dtype=np.int64)
        # Ids that were alive before and are not after this write lost their slots.
        upper = min(count, max(0, count + n - self.capacity))
        evicted = np.arange(max(0, count - self.capacity), upper, dtype=np.int64)
        if kept.shape[0]:
            slots = ids % self.capacity
            first_slot = int(slots[0])
            if first_slot + len(slots) <= self.capacity:  # one run of slots: plain slice copies
                self.data[0, row, first_slot : first_slot + len(slots)] = kept[:, 0]
                self.data[1, row, first_slot : first_slot + len(slots)] = kept[:, 1]
            else:
                self.data[0, row, slots] = kept[:, 0]
                self.data[1, row, slots] = kept[:, 1]
        self.counts[row] = count + n
        return ids, evicted

    def next_slots(self, row: int, n: int) -> np.ndarray:
        """The slots a :meth:`write` of n entries to ``row`` fills."""
        count, kept = int(self.counts[row]), min(n, self.capacity)
        return np.arange(count + n - kept, count + n, dtype=np.int64) % self.capacity

    def read_keys(self, row: int, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.data[0, row, ids % self.capacity])

    def clear(self, row: int) -> None:
        self.counts[row] = 0

    def flush(self) -> None:
        self.data.flush()

    def close(self) -> None:
        """Drop the store's references to the mapping (the file stays; the owner removes it).
        The mapping goes with the last view of it: a table a retrieval handed out (saved for a
        backward pass, say) keeps reading valid memory. numpy holds no buffer export on its
        mmap, so closing the mmap here would unmap memory such views still point into (a
        backward pass after ``forward_lm`` without a state, which closes its memory, crashed)."""
        self._view = None
        self.data = None
