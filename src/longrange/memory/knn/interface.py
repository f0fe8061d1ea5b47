"""The index interface of the kNN memory and the one function that picks a backend.

An index finds, for each query, the stored keys with the largest inner product. It never
holds values: it returns *slots* of the :class:`~longrange.memory.knn.store.MemmapStore`, and
the memory reads the (key, value) pairs from there. Backends:

- ``exact`` (:class:`~longrange.memory.knn.exact.ExactIndex`): a matmul of the queries against
  every filled slot plus top-k, on the model's device; the reference for tests and the default
  on GPU.
- ``faiss`` (:class:`~longrange.memory.knn.faiss_index.FaissIndex`): one faiss index per batch
  row, keyed by entry id; an exact flat inner-product index by default, HNSW or IVF for large
  memories; faiss-gpu's flat index when it is installed and the memory lives on a GPU.

Dimensions: R rows searched, Q queries per row, D key width, K neighbours, M slots per row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longrange.memory.knn.store import MemmapStore

BACKENDS = ("auto", "exact", "faiss")
INDEX_KINDS = ("flat", "hnsw", "ivf")


class KNNIndex(ABC):
    """Maps entry ids of each row to keys and answers top-k inner-product searches."""

    name: str = ""

    def __init__(self, store: MemmapStore) -> None:
        self.store = store

    @abstractmethod
    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        """Index ``keys`` [n, D] under ``ids`` [n]; ``evicted`` ids no longer hold their key."""

    @abstractmethod
    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> Tensor:
        """queries [R, Q, D] float32 -> slots [R, Q, K] (int64, -1 where fewer than K are alive),
        best first, on the queries' device."""

    @abstractmethod
    def reset(self, row: int) -> None:
        """Forget every entry of ``row``."""

    def rebuild(self, row: int) -> None:
        """Re-index ``row`` from the store (its alive ids and their keys)."""
        self.reset(row)
        ids = self.store.alive_ids(row)
        if ids.size:
            self.add(row, ids, self.store.read_keys(row, ids), np.empty(0, dtype=np.int64))

    def save(self, directory: Path) -> None:  # noqa: B027 (optional hook)
        """Write what :meth:`load` needs beyond the store (nothing by default)."""

    def load(self, directory: Path) -> None:
        """Restore after the store has been loaded; by default re-index every row."""
        for row in range(self.store.rows):
            self.rebuild(row)

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Free the index's memory."""


def pad_slots(slots: Tensor, k: int) -> Tensor:
    """Pad the last dimension of ``slots`` with -1 up to ``k``."""
    missing = k - slots.shape[-1]
    if missing <= 0:
        return slots
    return torch.cat([slots, slots.new_full((*slots.shape[:-1], missing), -1)], dim=-1)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``exact`` on a GPU (or without faiss), else ``faiss``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "exact" if device.type != "cpu" or not faiss_available() else "faiss"
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu); use 'exact'")
    return backend


def make_index(
    backend: str,
    store: MemmapStore,
    *,
    kv: Tensor,
    kind: str = "flat",
    device: torch.device,
    options: dict | None = None,
    threads: int = 1,
) -> KNNIndex:
    """Build the index for ``store``; ``kv`` is the [R, M, 2, D] tensor the exact index reads."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index must be one of {list(INDEX_KINDS)}, got {kind!r}")
    options = dict(options or {})
    if backend == "exact":
        if kind != "flat" or options:
            raise ValueError(
                f"the exact backend is a flat search; index={kind!r} / index options {sorted(options)} "
                "need backend='faiss'"
            )
        from longrange.memory.knn.exact import ExactIndex

        return ExactIndex(store, kv)
    from longrange.memory.knn.faiss_index import FaissIndex

    return FaissIndex(store, kind=kind, device=device, threads=threads, **options)
