"""kNN search with faiss: one inner-product index per batch row, keyed by entry id.

Index kinds:
- ``flat`` (default): exact search, ``IndexIDMap2`` over ``IndexFlatIP``. When the FIFO
  overwrites a slot, the evicted id is removed before the new key is added, so every id the
  index returns still names the pair in its slot.
- ``ivf``: ``IndexIVFFlat`` (``nlist`` lists, ``nprobe`` searched). A row searches exactly
  until it holds ``train_size`` entries; then the lists are trained on them. Evicted ids are
  removed as for ``flat``.
- ``hnsw``: ``IndexHNSWFlat`` (``hnsw_m`` links, ``ef_search``, ``ef_construction``). HNSW
  cannot remove entries, so evicted ids stay in the graph and the search skips them with an
  id-range selector (ids below ``count - M`` are dead); when dead entries reach M the row is
  rebuilt from the store, so the cost stays amortised O(1) per entry.
- With faiss-gpu installed and the memory on a GPU, ``flat`` runs on ``GpuIndexFlatIP``
  (append-only like ``hnsw``).

``threads > 1`` searches and adds rows in a thread pool (faiss releases the GIL); the
reference's ``multiprocessing`` flag maps to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from longrange.memory.knn.interface import KNNIndex
from longrange.memory.knn.store import MemmapStore

INDEX_FILE = "knn.index.row{row}.faiss"


def alive_slots(
    ids: np.ndarray, dist: np.ndarray, count: int, capacity: int, k: int, *, reorder: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Entry ids [Q, k'] (-1: none) and their scores -> (slots [Q, K], -1 where the id is dead
    or missing; scores [Q, K], -inf there); with ``reorder`` the alive ids move to the front,
    keeping their order (best first)."""
    alive = (ids >= max(0, count - capacity)) & (ids < count)
    if reorder:
        order = np.argsort(~alive, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        alive = np.take_along_axis(alive, order, axis=1)
    ids, dist, alive = ids[:, :k], dist[:, :k], alive[:, :k]
    slots = np.where(alive, ids % capacity, -1)
    scores = np.where(alive, dist, -np.inf).astype(np.float32)
    if slots.shape[1] < k:
        pad = ((0, 0), (0, k - slots.shape[1]))
        slots = np.pad(slots, pad, constant_values=-1)
        scores = np.pad(scores, pad, constant_values=-np.inf)
    return slots, scores


class FaissIndex(KNNIndex):
    name = "faiss"

    def __init__(
        self,
        store: MemmapStore,
        *,
        kind: str = "flat",
        device: torch.device | None = None,
        threads: int = 1,
        hnsw_m: int = 32,
        ef_search: int = 64,
        ef_construction: int = 64,
        nlist: int | None = None,
        nprobe: int = 8,
        train_size: int | None = None,
    ) -> None:
        super().__init__(store)
        for name, value in (
            ("hnsw_m", hnsw_m),
            ("ef_search", ef_search),
            ("ef_construction", ef_construction),
            ("nprobe", nprobe),
            ("threads", threads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.kind, self.dim, self.capacity = kind, store.dim, store.capacity
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        default_nlist = max(1, min(int(math.sqrt(store.capacity)), store.capacity // 40))
        self.nlist = nlist if nlist is not None else default_nlist
        if not isinstance(self.nlist, int) or self.nlist < 1:
            raise ValueError(f"nlist must be a positive integer, got {nlist!r}")
        self.nprobe = nprobe
        self.train_size = min(store.capacity, train_size or 40 * self.nlist)
        if self.train_size < self.nlist:
            raise ValueError(f"train_size ({self.train_size}) must be at least nlist ({self.nlist})")
        self.gpu = (
            kind == "flat"
            and device is not None
            and torch.device(device).type == "cuda"
            and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0
        )
        self._gpu_resources = faiss.StandardGpuResources() if self.gpu else None
        self.append_only = kind == "hnsw" or self.gpu
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.indexes = [self._new_index() for _ in range(store.rows)]
        self.trained = [kind != "ivf"] * store.rows

    # --- per-row indexes ------------------------------------------------------------------
    def _new_index(self, trained: bool = False):
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.ef_search
            inner.hnsw.efConstruction = self.ef_construction
            return faiss.IndexIDMap(inner)
        if self.gpu:
            inner = faiss.GpuIndexFlatIP(self._gpu_resources, self.dim)
            return faiss.IndexIDMap(inner)
        if self.kind == "ivf" and trained:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = self.nprobe
            return index
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _map(self, fn, items):
        if self.pool is None or len(items) < 2:
            return [fn(*item) for item in items]
        return list(self.pool.map(lambda item: fn(*item), items))

    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        self.add_rows([(row, ids, keys, evicted)])

    def add_rows(self, items: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Several rows' :meth:`add` at once (in parallel with ``threads > 1``)."""
        rebuild = self._map(self._add_one, items)
        for (row, *_), needed in zip(items, rebuild):
            if needed:
                self.rebuild(row)

    def _add_one(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> bool:
        index = self.indexes[row]
        if evicted.size and not self.append_only:
            index.remove_ids(evicted)
        if ids.size:
            index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), ids)
        if self.kind == "ivf" and not self.trained[row] and self.store.filled(row) >= self.train_size:
            return True  # enough entries to train the lists: rebuild as a trained IVF
        # Append-only indexes keep dead entries; rebuild once they are as many as the slots.
        return self.append_only and index.ntotal - self.store.filled(row) >= self.capacity

    def reset(self, row: int) -> None:
        self.indexes[row] = self._new_index()
        self.trained[row] = self.kind != "ivf"

    def rebuild(self, row: int) -> None:
        ids = self.store.alive_ids(row)
        keys = self.store.read_keys(row, ids) if ids.size else np.empty((0, self.dim), np.float32)
        if self.kind == "ivf" and ids.size >= self.train_size:
            index = self._new_index(trained=True)
            index.train(keys)
            self.trained[row] = True
        else:
            index = self._new_index()
            self.trained[row] = self.kind != "ivf"
        if ids.size:
            index.add_with_ids(keys, ids)
        self.indexes[row] = index

    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        rows = list(rows)
        q_np = queries.detach().to("cpu", torch.float32).numpy()
        out = self._map(self._search_one, [(row, q_np[i], k) for i, row in enumerate(rows)])
        slots = torch.from_numpy(np.stack([o[0] for o in out])).to(queries.device)
        scores = torch.from_numpy(np.stack([o[1] for o in out])).to(queries.device)
        return slots, scores

    def _search_one(self, row: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.indexes[row]
        count, filled = int(self.store.counts[row]), self.store.filled(row)
        if filled == 0 or k == 0:
            return np.full((queries.shape[0], k), -1, dtype=np.int64), np.full(
                (queries.shape[0], k), -np.inf, dtype=np.float32
            )
        dead = index.ntotal - filled
        queries = np.ascontiguousarray(queries)
        if dead > 0 and self.kind == "hnsw":
            # The graph keeps evicted entries; a range selector on the ids skips them during the
            # walk, so the cost does not grow with the number of dead entries.
            params = faiss.SearchParametersHNSW(
                sel=faiss.IDSelectorRange(max(0, count - self.capacity), count),
                efSearch=max(self.ef_search, k),
            )
            dist, ids = index.search(queries, min(k, filled), params=params)
            dead = 0
        else:
            fetch = min(index.ntotal, k + dead if self.append_only else k)
            dist, ids = index.search(queries, fetch)
        return alive_slots(ids, dist, count, self.capacity, k, reorder=dead > 0)

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        for row, index in enumerate(self.indexes):
            cpu = faiss.index_gpu_to_cpu(index) if self.gpu else index
            faiss.write_index(cpu, str(directory / INDEX_FILE.format(row=row)))

    def load(self, directory: Path) -> None:
        for row in range(self.store.rows):
            path = directory / INDEX_FILE.format(row=row)
            index = None
            if path.is_file() and not self.gpu:
                try:
                    index = faiss.read_index(str(path))
                except RuntimeError:
                    index = None
            if index is None or index.d != self.dim or not self._consistent(row, index):
                self.rebuild(row)  # missing, foreign or stale index file: re-index from the store
                continue
            self.indexes[row] = index
            self.trained[row] = self.kind != "ivf" or isinstance(faiss.downcast_index(index), faiss.IndexIVF)

    def _consistent(self, row: int, index) -> bool:
        filled = self.store.filled(row)
        if self.append_only:
            return filled <= index.ntotal < filled + self.capacity
        return index.ntotal == filled

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        self.indexes = []
