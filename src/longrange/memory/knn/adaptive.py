"""The ``auto`` kNN index: exact while a row is small, an inverted-file index beyond.

An exact search costs a [Q x F] matmul and a top-k over it per chunk, linear in the F filled
slots: at 32K entries it costs as much as the model's own step. An inverted file (IVF) cuts
the keys into ``nlist`` cells around centroids and scans, for each query, only the ``nprobe``
cells whose centroids score best, so it reads about ``nprobe / nlist`` of the memory.

Per batch row:
- below ``exact_limit`` filled slots the search is exact (torch, :func:`exact.exact_search` on
  the store's key table) and there is no index;
- at ``exact_limit`` the row gets an inverted file (:class:`~longrange.memory.knn.cells.CellLists`,
  keys in float32 grouped by cell, scanned by our own kernel: ``cells.py`` says why not
  faiss's), its centroids trained on the row's keys (spherical k-means in torch: unit keys,
  inner-product cells) with ``nlist = cells_per_root * sqrt(F)`` cells (a cell holds about
  sqrt(F) / 8 keys), but no more than F / 16 cells. At 250,000 entries, 8 cells per root
  against 4 scans half as many keys per query at the same ``nprobe`` (recall@32 0.94 against
  0.96, search time down by a third); at 32K the search costs about the same either way, by
  probe more than by key;
- k-means runs 6 iterations over a random sample of 16 keys per cell (seeded by the row's
  count of entries written, so a training is reproducible; an evenly strided sample aliased
  with keys periodic in slot order and left one cell with a sixteenth of them): on the bench
  model's keys at 250,000 entries and 2896 cells, recall@32 at 24 probes is 0.946 against
  0.941 with 12 iterations over 32 keys per cell, and a training takes 1.2 s instead of 5.0;
- the row is re-trained (new centroids, every alive entry re-added) when its fill has doubled
  since the last training (the cells would grow) and when the whole memory has been
  overwritten since (the keys drift as the model trains, the centroids would go stale). An
  add that makes the row due for it only stops indexing (the store holds every entry); the
  row's next search trains it from the store, on the same entries an eager training would
  have seen, so a training whose row is never searched again (a memory's last chunk) is not
  paid for;
- the lists hold store slots: an overwritten slot leaves its cell as its new key enters one,
  so every slot found holds the key it was scored against;
- a search scores the queries against the centroids with one torch matmul and picks each
  query's cells (:func:`~longrange.memory.knn.cells.probe_cells`, compiled beside the scan;
  faiss's own quantizer search heap-sorts every centroid of every query; numpy's
  argpartition took twice as long as torch's topk over 2048 x 2896 scores), then scans them
  (:meth:`~longrange.memory.knn.cells.CellLists.search`): the scores it returns are the exact
  inner products;
- keys go to their cells (training and adding) by :func:`~longrange.ops.select.argmax_last`;
- saved, a row keeps its centroids (``knn.index.row{row}.centroids.npy``); loading assigns the
  stored keys to them again.

``longrange bench knn`` measures the recall@k of this index against exact search on a
model's own keys and queries, and the per-chunk cost as the memory fills.

Dimensions: Q queries, F filled slots of a row, C cells (nlist), P probed cells, D key width,
K neighbours.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longrange.atomic import atomic_write_bytes
from longrange.memory.knn.cells import CellLists, nearest_cells, probe_cells
from longrange.memory.knn.exact import exact_search, search_rows
from longrange.memory.knn.interface import KNNIndex
from longrange.memory.knn.store import MemmapStore

# A cell holds at least this many keys on average: with few keys per cell, nprobe cells hold
# too few candidates for a top-32 while the memory is small.
MIN_CELL_KEYS = 16
# queries whose cells are chosen at once: 2,048 queries against 1,448 cells took 5.0 ms as one
# [2048, 1448] score matrix, 4.4 ms in blocks of 256 (1.5 MB, cached between the product and
# the choice)
PROBE_QUERIES = 256
META_FILE = "knn.index.auto.json"
CENTROIDS_FILE = "knn.index.row{row}.centroids.npy"


def train_centroids(keys: Tensor, cells: int, *, iterations: int = 6, seed: int = 0) -> Tensor:
    """Spherical k-means: ``cells`` unit centroids [C, D] for unit keys [F, D] (each key goes to
    the centroid with the largest inner product; a centroid is its keys' normalised mean; an
    empty cell keeps its centroid)."""
    gen = torch.Generator().manual_seed(seed)
    centroids = keys[torch.randperm(keys.shape[0], generator=gen)[:cells]].clone()
    for _ in range(iterations):
        assign = nearest_cells(keys, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, keys)
        norms = sums.norm(dim=1, keepdim=True)
        centroids = torch.where(norms > 0, sums / norms.clamp_min(1e-12), centroids)
    return centroids.contiguous()


class AdaptiveIndex(KNNIndex):
    name = "auto"

    def __init__(
        self,
        store: MemmapStore,
        keys: Tensor,
        *,
        exact_limit: int = 1024,
        cells_per_root: float = 8.0,
        nprobe: int = 24,
        train_points: int = 16,
        threads: int = 1,
    ) -> None:
        super().__init__(store)
        for name, value in (("exact_limit", exact_limit), ("nprobe", nprobe), ("train_points", train_points)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not cells_per_root > 0:
            raise ValueError(f"cells_per_root must be positive, got {cells_per_root!r}")
        self.keys = keys  # [R, M, D]: the store's key table (a view)
        self.exact_limit, self.cells_per_root = exact_limit, float(cells_per_root)
        self.nprobe, self.train_points, self.threads = nprobe, train_points, threads
        rows = store.rows
        self.indexes: list[CellLists | None] = [None] * rows  # per row: None (exact) or its inverted file
        self.trained_count = [0] * rows  # the row's count (entries written) at its training
        self.trained_filled = [0] * rows  # and its filled slots then

    # --- per-row state ----------------------------------------------------------------------
    def cells(self, filled: int) -> int:
        return max(1, min(filled // MIN_CELL_KEYS, int(self.cells_per_root * math.sqrt(filled))))

    def _stale(self, row: int) -> bool:
        filled, count = self.store.filled(row), int(self.store.counts[row])
        if self.indexes[row] is None:
            return filled >= self.exact_limit
        grown = filled >= 2 * self.trained_filled[row]
        turned_over = count - self.trained_count[row] >= self.store.capacity
        return grown or turned_over

    def _train(self, row: int) -> None:
        """(Re)build the row's IVF from its alive entries."""
        ids = self.store.alive_ids(row)
        keys = torch.from_numpy(self.store.read_keys(row, ids))
        cells, count = self.cells(len(ids)), int(self.store.counts[row])  # count: the seed too
        sample = keys
        if len(ids) > cells * self.train_points:
            # a random sample: an evenly strided one aliases with keys periodic in slot order
            gen = torch.Generator().manual_seed(count)
            sample = keys[torch.randperm(len(ids), generator=gen)[: cells * self.train_points]]
        centroids = train_centroids(sample, cells, seed=count)
        self._install(row, centroids, ids, keys)
        self.trained_count[row], self.trained_filled[row] = count, len(ids)

    def _install(self, row: int, centroids: Tensor, ids: np.ndarray, keys: Tensor) -> None:
        """The row's inverted file around ``centroids``, holding the entries ``ids`` (keys [F, D])."""
        slots = torch.from_numpy(np.asarray(ids, dtype=np.int64) % self.store.capacity)
        lists = CellLists(centroids, self.store.capacity, slots, keys)
        self.indexes[row] = lists

    # --- the interface ----------------------------------------------------------------------
    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        lists = self.indexes[row]
        if lists is None or self._stale(row):
            return  # the next search of the row (re)trains it from the store
        # The lists hold slots: the evicted entries' slots are among those written now (the
        # store is a ring), and an add replaces what its slots held.
        slots = torch.from_numpy(np.asarray(ids, dtype=np.int64) % self.store.capacity)
        lists.add(slots, torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)))

    def reset(self, row: int) -> None:
        self.indexes[row] = None
        self.trained_count[row] = self.trained_filled[row] = 0

    def rebuild(self, row: int) -> None:
        self.reset(row)
        if self._stale(row):
            self._train(row)

    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        rows = list(rows)
        for row in rows:
            if self._stale(row):
                self._train(row)
        if all(self.indexes[row] is None for row in rows):
            # the exact backend's own search (one product over the rows): a product per row
            # has other shapes, whose sums round differently in the last bit
            return search_rows(self.keys, self.store, rows, queries, k)
        slots, scores = [], []
        for i, row in enumerate(rows):
            q = queries[i : i + 1]
            if self.indexes[row] is None:
                filled = np.minimum(self.store.counts[[row]], self.store.capacity)
                found = exact_search(self.keys[row : row + 1, : int(filled[0])], filled, q, k)
            else:
                found = self._search_ivf(row, q[0], k)
            slots.append(found[0])
            scores.append(found[1])
        return torch.cat(slots), torch.cat(scores)

    def _search_ivf(self, row: int, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        lists = self.indexes[row]
        centroids = lists.centroids
        q = queries.detach().to("cpu", torch.float32).contiguous()
        probes = min(self.nprobe, centroids.shape[0])
        threads = max(self.threads, torch.get_num_threads())
        # The probed cells in any order (the scan reads them cell by cell), chosen for
        # PROBE_QUERIES queries at a time: their centroid scores stay in cache for the choice.
        cells = torch.empty(q.shape[0], probes, dtype=torch.long)
        by_cell = q.new_empty(min(PROBE_QUERIES, q.shape[0]), centroids.shape[0])  # reused
        for start in range(0, q.shape[0], PROBE_QUERIES):
            part = q[start : start + PROBE_QUERIES]
            scored = torch.mm(part, centroids.T, out=by_cell[: part.shape[0]])
            cells[start : start + part.shape[0]] = probe_cells(scored, probes, threads=threads)
        slots, scores = lists.search(q, cells, k, threads=threads)
        device = queries.device
        return slots[None].to(device), scores[None].to(device)

    # --- persistence ------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        meta = []
        for row, lists in enumerate(self.indexes):
            if lists is None or self._stale(row):  # stale: the loaded row is re-trained
                meta.append(None)
                continue
            buffer = io.BytesIO()
            np.save(buffer, lists.centroids.numpy(), allow_pickle=False)
            atomic_write_bytes(directory / CENTROIDS_FILE.format(row=row), buffer.getvalue())
            meta.append({"count": self.trained_count[row], "filled": self.trained_filled[row]})
        (directory / META_FILE).write_text(json.dumps({"rows": meta}))

    def load(self, directory: Path) -> None:
        try:
            meta = json.loads((directory / META_FILE).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            meta = [None] * self.store.rows
        for row in range(self.store.rows):
            saved = meta[row] if row < len(meta) else None
            if saved is None or not self._load_row(row, directory, saved):
                self.rebuild(row)  # missing, foreign or stale: re-index from the store

    def _load_row(self, row: int, directory: Path, saved: dict) -> bool:
        """The row's saved centroids, its stored entries assigned to them again; False when
        they are missing or do not fit this store."""
        try:
            centroids = np.load(directory / CENTROIDS_FILE.format(row=row), allow_pickle=False)
            count, filled = int(saved["count"]), int(saved["filled"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != self.store.dim:
            return False
        if not len(centroids) or not np.isfinite(centroids).all():
            return False
        ids = self.store.alive_ids(row)
        self._install(row, torch.from_numpy(centroids), ids, torch.from_numpy(self.store.read_keys(row, ids)))
        self.trained_count[row], self.trained_filled[row] = count, filled
        return True

    def close(self) -> None:
        self.indexes = [None] * self.store.rows
