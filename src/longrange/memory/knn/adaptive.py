"""The ``auto`` kNN index: exact while a row is small, an inverted-file index beyond.

An exact search costs a [Q x F] matmul and a top-k over it per chunk, linear in the F filled
slots: at 32K entries it costs as much as the model's own step. An inverted file (IVF) cuts
the keys into ``nlist`` cells around centroids and scans, for each query, only the ``nprobe``
cells whose centroids score best, so it reads about ``nprobe / nlist`` of the memory.

Per batch row:
- below ``exact_limit`` filled slots the search is exact (torch, :func:`exact.exact_search` on
  the store's key table) and there is no index;
- at ``exact_limit`` the row gets a faiss IVF index keyed by entry id, its centroids
  trained on the row's keys (spherical k-means in torch: unit keys, inner-product cells) with
  ``nlist = cells_per_root * sqrt(F)`` cells (a cell holds about sqrt(F) / 8 keys), but no
  more than F / 16 cells. At 250,000 entries, 8 cells per root against 4 scans half as
  many keys per query at the same ``nprobe`` (recall@32 0.94 against 0.96, search time
  down by a third); at 32K the search costs about the same either way, by probe more than
  by key;
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
- evicted ids are removed by id (a hash-table direct map), so every id still names the pair
  in its slot;
- the index stores each key as float16 codes, scored against the raw key (no residual): the
  scan is bound by the bytes it reads, so half-width codes cut it by about a quarter at the
  same recall (250,000 entries, 2048 queries: 54 -> 40 ms, recall@32 0.939 -> 0.938);
- a search scores the queries against the centroids with one torch matmul and picks each
  query's cells with a top-k (:func:`~longrange.ops.select.top_k_columns`; faiss's own
  quantizer search heap-sorts every centroid of every query; numpy's argpartition took twice
  as long as torch's topk over 2048 x 2896 scores), hands them to ``search_preassigned``,
  then scores the K picks of each query again against the store's float32 keys, so the
  scores it returns are the exact inner products;
- keys go to their cells (training and adding) by :func:`~longrange.ops.select.argmax_last`.

``longrange bench knn`` measures the recall@k of this index against exact search on a
model's own keys and queries, and the per-chunk cost as the memory fills.

Dimensions: Q queries, F filled slots of a row, C cells (nlist), P probed cells, D key width,
K neighbours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from longrange.memory.knn.exact import exact_search
from longrange.memory.knn.faiss_index import alive_slots
from longrange.memory.knn.interface import KNNIndex
from longrange.memory.knn.store import MemmapStore
from longrange.ops.select import argmax_last, top_k_columns

# A cell holds at least this many keys on average: with few keys per cell, nprobe cells hold
# too few candidates for a top-32 while the memory is small.
MIN_CELL_KEYS = 16
# faiss's parallel mode for search_preassigned: in the default (0) a direct call runs on one
# thread (search() splits the queries itself); 3 splits the queries across the threads. 2048
# queries at 32K entries, 2 threads: 25 -> 15 ms, the same results.
SEARCH_PARALLEL_MODE = 3
META_FILE = "knn.index.auto.json"
INDEX_FILE = "knn.index.row{row}.ivf"


def nearest_cells(keys: Tensor, centroids: Tensor, *, block: int = 1024) -> Tensor:
    """The cell of each key [F, D]: the centroid [C, D] with the largest inner product, as int64
    [F]. Scored ``block`` keys at a time, so the scores never exceed a [block, C] tile (at
    250,000 keys and 4,000 cells the whole [F, C] matrix would take 4 GB)."""
    cells = torch.empty(keys.shape[0], dtype=torch.long)
    by_column = centroids.T.contiguous()
    for start in range(0, keys.shape[0], block):
        cells[start : start + block] = argmax_last(keys[start : start + block] @ by_column)
    return cells


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
        self.indexes: list = [None] * rows  # per row: None (exact) or a faiss IVF index
        self.centroids: list[Tensor | None] = [None] * rows
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
        self._install(row, centroids)
        self._add(row, ids, keys)
        self.trained_count[row], self.trained_filled[row] = count, len(ids)

    def _install(self, row: int, centroids: Tensor) -> None:
        quantizer = faiss.IndexFlatIP(centroids.shape[1])
        quantizer.add(centroids.numpy())
        cells, dim = centroids.shape
        # Half-precision codes, scored against the raw key (no residual): the scan reads half
        # the bytes of float32 codes at the same recall; the search re-scores its picks exactly.
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, cells, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False
        )
        index.train(centroids.numpy())  # the quantizer holds its cells already; fp16 codes need no ranges
        index.own_fields = True  # the index keeps (and frees) its quantizer
        quantizer.this.disown()
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.indexes[row], self.centroids[row] = index, centroids

    def _add(self, row: int, ids: np.ndarray, keys: Tensor) -> None:
        if not len(ids):
            return
        cells = nearest_cells(keys, self.centroids[row]).numpy()
        x = np.ascontiguousarray(keys.numpy(), dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.indexes[row].add_core(len(ids), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(cells))

    # --- the interface ----------------------------------------------------------------------
    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        index = self.indexes[row]
        if index is None or self._stale(row):
            return  # the next search of the row (re)trains it from the store
        if evicted.size:
            evicted = np.ascontiguousarray(evicted, dtype=np.int64)
            index.remove_ids(faiss.IDSelectorArray(len(evicted), faiss.swig_ptr(evicted)))
        self._add(row, ids, torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)))

    def reset(self, row: int) -> None:
        self.indexes[row] = self.centroids[row] = None
        self.trained_count[row] = self.trained_filled[row] = 0

    def rebuild(self, row: int) -> None:
        self.reset(row)
        if self._stale(row):
            self._train(row)

    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        rows = list(rows)
        slots, scores = [], []
        for i, row in enumerate(rows):
            q = queries[i : i + 1]
            if self._stale(row):
                self._train(row)
            if self.indexes[row] is None:
                filled = np.minimum(self.store.counts[[row]], self.store.capacity)
                found = exact_search(self.keys[row : row + 1, : int(filled[0])], filled, q, k)
            else:
                found = self._search_ivf(row, q[0], k)
            slots.append(found[0])
            scores.append(found[1])
        return torch.cat(slots), torch.cat(scores)

    def _search_ivf(self, row: int, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        index, centroids = self.indexes[row], self.centroids[row]
        q = queries.detach().to("cpu", torch.float32).contiguous()
        probes = min(self.nprobe, centroids.shape[0])
        # The probed cells in any order (the scan merges them).
        cells = top_k_columns(q @ centroids.T, probes).numpy()
        index.nprobe = probes
        index.parallel_mode = SEARCH_PARALLEL_MODE
        faiss.omp_set_num_threads(max(self.threads, torch.get_num_threads()))
        # Scans of codes stored without residual ignore the coarse scores.
        unused = np.zeros(cells.shape, np.float32)
        dist, ids = index.search_preassigned(q.numpy(), k, cells, unused)
        count, capacity = int(self.store.counts[row]), self.store.capacity
        slots, _ = alive_slots(ids, dist, count, capacity, k, reorder=False)
        slots, scores = self._rescore(row, q, torch.from_numpy(slots))
        device = queries.device
        return slots[None].to(device), scores[None].to(device)

    def _rescore(self, row: int, q: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """The exact inner products q [Q, D] . key[slot] of the chosen slots [Q, K] (-1: none,
        scored -inf), best first: the codes the scan read are rounded. One fused call reads
        each chosen key in place (``embedding_bag``'s per-sample-weight gradient is exactly
        these products), with no [Q, K, D] gather: a chunk at 32K memories 1.02x."""
        found = slots >= 0
        n, k = slots.shape
        bags = torch.arange(n)
        scores = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            q, self.keys[row], slots.clamp_min(0).flatten(), bags * k, bags.repeat_interleave(k), 0
        )
        scores = scores.view(n, k).masked_fill_(~found, -math.inf)
        scores, order = scores.sort(dim=1, descending=True)
        return slots.gather(1, order), scores

    # --- persistence ------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        meta = []
        for row, index in enumerate(self.indexes):
            if index is None or self._stale(row):  # stale: the loaded row is re-trained
                meta.append(None)
                continue
            faiss.write_index(index, str(directory / INDEX_FILE.format(row=row)))
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
        try:
            index = faiss.read_index(str(directory / INDEX_FILE.format(row=row)))  # owns its quantizer
            quantizer = faiss.downcast_index(index.quantizer)
            centroids = torch.from_numpy(quantizer.reconstruct_n(0, quantizer.ntotal))
        except (RuntimeError, AttributeError):
            return False
        if index.d != self.store.dim or index.ntotal != self.store.filled(row):
            return False
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.indexes[row], self.centroids[row] = index, centroids
        self.trained_count[row], self.trained_filled[row] = int(saved["count"]), int(saved["filled"])
        return True

    def close(self) -> None:
        self.indexes = [None] * self.store.rows
        self.centroids = [None] * self.store.rows
