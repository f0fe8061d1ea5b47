"""The index interface of the kNN memory (``factory.py`` picks and builds a backend).

An index finds, for each query, the stored keys with the largest inner product. It never
holds values: it returns *slots* of the :class:`~longrange.memory.knn.store.MemmapStore`, and
the memory reads the (key, value) pairs from there. Backends:

- ``exact`` (:class:`~longrange.memory.knn.exact.ExactIndex`): a matmul of the queries against
  every filled slot plus top-k, on the model's device; the reference for tests and the default
  on GPU.
- ``faiss``: index ``auto`` (the default, :class:`~longrange.memory.knn.adaptive.AdaptiveIndex`)
  chooses by size: the exact search while a row is small, an inverted file beyond (our own,
  :mod:`~longrange.memory.knn.cells`, with a compiled scan);
  ``flat``, ``hnsw`` and ``ivf`` (:class:`~longrange.memory.knn.faiss_index.FaissIndex`) fix one
  kind of faiss index per batch row, keyed by entry id; faiss-gpu's flat index when it is
  installed and the memory lives on a GPU.

A search returns the slots and their scores (the inner products), so that a caller can
weigh the retrieved values without gathering the keys again.

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
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


class KNNIndex(ABC):
    """Maps entry ids of each row to keys and answers top-k inner-product searches."""

    name: str = ""

    def __init__(self, store: MemmapStore) -> None:
        self.store = store

    @abstractmethod
    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        """Index ``keys`` [n, D] under ``ids`` [n]; ``evicted`` ids no longer hold their key."""

    @abstractmethod
    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """queries [R, Q, D] float32 -> (slots [R, Q, K] int64, -1 where fewer than K are alive;
        scores [R, Q, K] float32, the inner products, -inf where the slot is -1), best first,
        on the queries' device."""

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


def pad_slots(slots: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pad the last dimension of ``slots`` with -1 (and ``scores`` with -inf) up to ``k``."""
    missing = k - slots.shape[-1]
    if missing <= 0:
        return slots, scores
    shape = (*slots.shape[:-1], missing)
    return (
        torch.cat([slots, slots.new_full(shape, -1)], dim=-1),
        torch.cat([scores, scores.new_full(shape, float("-inf"))], dim=-1),
    )
