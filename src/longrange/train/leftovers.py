"""What killed processes leave behind: kNN memory folders, removed when a run starts.

The Memorizing family keeps its kNN memories in memory-mapped files under a fresh folder
``longrange-knn-*`` in the system temporary folder (or the model's knn_memories_directory).
A process that ends normally, or by SIGINT / SIGTERM through the trainer, removes its folder;
one killed outright (SIGKILL, a crash, the machine going down) cannot, and the files (up to
gigabytes) would stay forever. A starting run therefore removes the folders whose owner is
gone.

A folder is in use while its owner holds the folder's lock (``.knn.lock``, taken by the kNN
store for the memory's whole life), so a folder whose lock can be taken has no live owner,
with one gap: between creating the folder and locking it. The ``OWNER`` marker the kNN store
writes into each folder (the creating process's id) closes the gap: a folder is removed at
once when the process it names is gone, and kept while that process lives. Without a marker
a folder is removed only once it has not changed for ``grace_s`` seconds. Folders of other
users are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from longrange.memory.knn.store import LOCK_NAME, OWNER_NAME

KNN_PREFIX = "longrange-knn-"
GRACE_S = 600.0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_gone(folder: Path, grace_s: float, now: float) -> bool:
    """Whether nothing says the folder is in use: its marker names a process that is gone,
    or (no readable marker) it has not changed for ``grace_s`` seconds."""
    try:
        pid = int((folder / OWNER_NAME).read_text().strip())
    except (OSError, ValueError):
        return now - folder.stat().st_mtime > grace_s
    return pid != os.getpid() and not process_alive(pid)


def remove_stale_knn_folders(parents: list[Path], *, grace_s: float = GRACE_S) -> list[Path]:
    """Remove the ``longrange-knn-*`` folders directly under ``parents`` whose owner is gone;
    return the folders removed. Errors on one folder (permissions, a race with its owner) only
    skip that folder."""
    removed = []
    now = time.time()
    uid = os.getuid() if hasattr(os, "getuid") else None
    for parent in dict.fromkeys(Path(p) for p in parents):
        try:
            candidates = [p for p in parent.iterdir() if p.name.startswith(KNN_PREFIX)]
        except OSError:
            continue
        for folder in candidates:
            with contextlib.suppress(OSError):
                info = folder.lstat()
                if not folder.is_dir() or folder.is_symlink() or (uid is not None and info.st_uid != uid):
                    continue
                if _remove_if_stale(folder, grace_s, now):
                    removed.append(folder)
    return removed


def _remove_if_stale(folder: Path, grace_s: float, now: float) -> bool:
    # Decide before touching the lock: probing the lock of a folder whose owner is about to
    # take it would make the owner fail.
    if not _owner_gone(folder, grace_s, now):
        return False
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False  # a live process holds it
    try:
        shutil.rmtree(folder)
        return True
    finally:
        with contextlib.suppress(OSError):
            lock.release()


def knn_parents(model_config) -> list[Path]:
    """Where a model's kNN memory folders are made: the system temporary folder, and the
    config's knn_memories_directory when it names one."""
    parents = [Path(tempfile.gettempdir())]
    configured = getattr(model_config, "knn_memories_directory", None)
    if configured:
        parents.append(Path(configured))
    return parents
