"""The inverted file of the ``auto`` kNN index (``adaptive.py``): a row's keys grouped by
the cell of their nearest centroid, and the scan that scores each query against the keys of
the cells it probes.

Why not faiss's: at a memorizing chunk (2,048 queries, 24 probed cells) faiss's scan of
half-precision codes took 14.6-19.4 ms at 32K entries, half of it keeping each query's
top-32 in a heap, and its rounded scores had to be re-scored exactly (2.5 ms more). Here:

- the keys are kept in float32, so a score is the exact inner product (no re-scoring);
- a cell holds its keys in blocks of 16, each block laid out [D, 16] (a key a column), so one
  query against one block is D multiply-adds of 16 lanes, with no horizontal sum;
- the scan (``cells.cpp``, compiled on first use by :mod:`longrange.native`, with AVX-512 /
  AVX2 clones on x86) runs cell by cell: a cell's blocks are read once for all the queries
  probing it, which keeps them in L1 (query by query, the same scan waited on L3: 6.8
  against 3.6 ms for the scores alone);
- the scores go to a scratch buffer, query after query, and each query's best K are picked
  once at the end with a bound from the maxima of interleaved groups (``top_of_row``, shared
  with :func:`probe_cells`): inserting into a sorted top-K as the scores came cost as much as
  the scores; a buffer of 2K candidates above a running threshold, cut back whenever full,
  2 ms more than picking at the end; a candidate's column follows from its place in the
  scratch and the layout block each 16 scores came from, noted once per block as the scan
  writes them (a column stored beside every score cost 2.9 of 10.3 ms in the model; sorting
  each query's cells after the scan and mapping their blocks again, 0.8 ms of 6);
- a thread scores the queries probing a cell four at a time, each row of a block loaded once
  for the four, and the selection gathers its candidates without a branch per score.

The threads take contiguous ranges of queries (split by parity, their writes to neighbouring
cursors shared cache lines). At 32K entries of the bench model (1,448 cells, 24 probes,
K = 32): 4.6 ms (7.5 before the ranges and the block map, 6.1 before the four-query scoring
and the branch-free gathering) against faiss's 16 plus the re-scoring, the same neighbours
(recall@32 0.969 against exact search, faiss's 0.968). Where the scan cannot be built (no
compiler, not Linux) :meth:`CellLists.search` runs :func:`search_reference`, the same
result in torch ops (slower; also what tests compare the scan with).

Each cell has room for half as many keys again as it held when the lists were built
(:meth:`CellLists.build`); added keys go to the end of their cell, removed ones leave an empty
column, and a cell that overflows (or holes outnumbering the keys) rebuilds the lists from the
keys they hold, without assigning them again. Memory: a float32 copy of the row's keys, about
1.5x with the room.

Dimensions: F keys held, C cells, D key width, Q queries, P probed cells, K neighbours.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from longrange.native import OptionalLibrary

SOURCE = Path(__file__).with_name("cells.cpp")
BLOCK = 16  # keys per block: one AVX-512 register of float32 lanes
# search_reference gathers at most about this many bytes of keys per probe at once
REFERENCE_BYTES = 32 << 20


def _declare(lib: ctypes.CDLL) -> None:
    lib.longrange_cells_search.restype = ctypes.c_int
    lib.longrange_top_columns.restype = ctypes.c_int
    lib.longrange_cells_place.restype = ctypes.c_int


LIBRARY = OptionalLibrary(
    "knn_cells",
    [SOURCE],
    missing="the kNN index's compiled scan is unavailable",
    instead="it searches with torch ops instead (the same results, slower)",
    setup=_declare,
    openmp=True,
)


def _load() -> ctypes.CDLL | None:
    return LIBRARY.load()


def scan_available() -> bool:
    """Whether the compiled scan runs here (else :func:`search_reference` does)."""
    return _load() is not None


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def probe_cells(scores: Tensor, k: int, *, threads: int = 1) -> Tensor:
    """The cells a search probes: the columns of each row's k largest centroid scores
    [Q, C] -> [Q, k], in no order (the set of :func:`~longrange.ops.select.top_k_columns`,
    which answers where the scan is not built). Compiled (``top_of_row`` in ``cells.cpp``):
    the maxima of 16 interleaved groups of columns bound the k-th best from below, and only the
    columns of the groups reaching that bound are kept; 2048 x 1448 scores at k = 24, 4.4-5.8
    ms with torch's top-k, 2.9 ms compiled, 1.7 ms with the group maxima kept in registers, a
    32-bit count in the bound's bisection and no final sort, on 2 threads."""
    n, c = scores.shape
    if not 0 < k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    lib = _load()
    if lib is None or scores.device.type != "cpu" or scores.dtype != torch.float32:
        from longrange.ops.select import top_k_columns

        return top_k_columns(scores, k)
    scores = scores.contiguous()
    out = torch.empty(n, k, dtype=torch.long)
    sizes = (ctypes.c_int64(n), ctypes.c_int64(c), ctypes.c_int64(k))
    if lib.longrange_top_columns(_ptr(scores), *sizes, _ptr(out), ctypes.c_int(threads)) != 0:
        raise MemoryError("the kNN cell choice could not allocate its buffers")
    return out


def nearest_cells(keys: Tensor, centroids: Tensor, *, block: int = 1024) -> Tensor:
    """The cell of each key [F, D]: the centroid [C, D] with the largest inner product, as int64
    [F]. Scored ``block`` keys at a time, so the scores never exceed a [block, C] tile (at
    250,000 keys and 4,000 cells the whole [F, C] matrix would take 4 GB)."""
    from longrange.ops.select import argmax_last

    cells = torch.empty(keys.shape[0], dtype=torch.long)
    for start in range(0, keys.shape[0], block):  # a transposed operand costs the GEMM nothing
        cells[start : start + block] = argmax_last(keys[start : start + block] @ centroids.T)
    return cells


class CellLists:
    """One row's inverted file over ``capacity`` store slots, cells around ``centroids`` [C, D]
    (module docstring). ``build`` lays keys out from scratch, ``add`` / ``remove`` change it
    by slot, ``search`` answers queries."""

    def __init__(
        self, centroids: Tensor, capacity: int, slots: Tensor | None = None, keys: Tensor | None = None
    ) -> None:
        """Lists over ``capacity`` slots holding keys [F, D] of ``slots`` [F] (none when not
        given), each assigned to its nearest centroid."""
        self.centroids = centroids.contiguous()
        cells, dim = self.centroids.shape
        self.cells, self.dim = cells, dim
        self.cell_of = torch.full((capacity,), -1, dtype=torch.long)  # slot -> cell
        self.column = torch.full((capacity,), -1, dtype=torch.long)  # slot -> column of the layout
        if slots is None or keys is None:
            slots, keys = torch.empty(0, dtype=torch.long), torch.empty(0, dim)
        self.build(slots, keys, nearest_cells(keys, self.centroids))

    def __len__(self) -> int:
        return int(self.filled.sum()) - self.holes

    def build(self, slots: Tensor, keys: Tensor, cells: Tensor) -> None:
        """Lay out keys [F, D] of ``slots`` [F] in their ``cells`` [F], each cell with room for
        half as many again (and one block for an empty cell)."""
        held = torch.bincount(cells, minlength=self.cells)
        room = (held + held // 2 + BLOCK - 1) // BLOCK + 1  # blocks per cell
        self.first = torch.zeros(self.cells, dtype=torch.long)
        self.first[1:] = room.cumsum(0)[:-1]
        self.room = room
        blocks = int(room.sum())
        self.keys = torch.zeros(blocks, self.dim, BLOCK, dtype=torch.float32)  # what the loops read
        self.slots = torch.full((blocks * BLOCK,), -1, dtype=torch.long)
        self.filled = torch.zeros(self.cells, dtype=torch.long)  # columns taken in each cell
        self.holes = 0
        self.cell_of.fill_(-1)
        self.column.fill_(-1)
        self._place(slots, keys, cells)

    def _place(self, slots: Tensor, keys: Tensor, cells: Tensor) -> bool:
        """Append keys to the end of their cells (in their order within a cell); False
        (nothing written) when one overflows. Compiled where the scan is
        (``longrange_cells_place``, cell by cell: 512 keys 0.27 -> 0.12 ms, a rebuild's 33K
        keys 5.6 -> 3.2 ms; the memorizing chunk with 32K filled 1.02x), else
        :meth:`_place_reference`."""
        if not len(slots):
            return True
        lib = _load()
        if lib is None:
            return self._place_reference(slots, keys, cells)
        keys = keys.to(torch.float32).contiguous()
        slots, cells = slots.to(torch.long).contiguous(), cells.to(torch.long).contiguous()
        status = lib.longrange_cells_place(
            _ptr(keys),
            _ptr(cells),
            _ptr(slots),
            ctypes.c_int64(len(slots)),
            ctypes.c_int64(self.dim),
            ctypes.c_int64(self.cells),
            _ptr(self.first),
            _ptr(self.room),
            _ptr(self.keys),
            _ptr(self.slots),
            _ptr(self.filled),
            _ptr(self.column),
            _ptr(self.cell_of),
        )
        if status == 2:
            raise MemoryError("placing keys in the kNN cells ran out of memory")
        return status == 0

    def _place_reference(self, slots: Tensor, keys: Tensor, cells: Tensor) -> bool:
        """:meth:`_place` with torch ops: sorted by cell (stably), each key's rank in its cell
        gives its column."""
        order = torch.argsort(cells, stable=True)
        slots, keys, cells = slots[order], keys[order], cells[order]
        counts = torch.bincount(cells, minlength=self.cells)
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(cells)) - group_start[cells]
        offset = self.filled[cells] + rank  # column inside the cell
        if bool((offset >= self.room[cells] * BLOCK).any()):
            return False
        column = self.first[cells] * BLOCK + offset
        self.keys[column // BLOCK, :, column % BLOCK] = keys.to(self.keys.dtype)
        self.slots[column] = slots
        self.column[slots] = column
        self.cell_of[slots] = cells
        self.filled += counts
        return True

    def remove(self, slots: Tensor) -> None:
        """Forget the keys of ``slots`` (those not held are ignored)."""
        column = self.column[slots]
        column = column[column >= 0]
        if len(column):
            self.slots[column] = -1
            self.holes += len(column)
        self.column[slots] = -1
        self.cell_of[slots] = -1

    def add(self, slots: Tensor, keys: Tensor) -> None:
        """Hold keys [n, D] for ``slots`` [n] (replacing what those slots held)."""
        self.remove(slots)
        cells = nearest_cells(keys, self.centroids)
        if self.holes <= len(self) and self._place(slots, keys, cells):
            return
        kept = self.slots >= 0  # rebuild from what is held, plus the new keys
        held_slots = self.slots[kept]
        held_keys = self.keys.transpose(1, 2).reshape(-1, self.dim)[kept]
        self.build(
            torch.cat((held_slots, slots)),
            torch.cat((held_keys, keys.to(held_keys.dtype))),
            torch.cat((self.cell_of[held_slots].clone(), cells)),
        )

    def used(self) -> Tensor:
        """Blocks of each cell that hold columns [C]."""
        return (self.filled + BLOCK - 1) // BLOCK

    def search(self, queries: Tensor, probes: Tensor, k: int, *, threads: int = 1) -> tuple[Tensor, Tensor]:
        """queries [Q, D] against the keys of their ``probes`` [Q, P] (cells, any order) ->
        (slots [Q, K], -1 past the candidates; scores [Q, K], the inner products, -inf there),
        best first."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(queries.shape)}")
        if probes.dim() != 2 or probes.shape[0] != queries.shape[0] or probes.is_floating_point():
            got = f"{probes.dtype} {list(probes.shape)}"
            raise ValueError(f"probes must be integer cells [Q = {queries.shape[0]}, P], got {got}")
        lib = _load()
        if lib is None:
            return search_reference(self, queries, probes, k)
        q = queries.to(self.keys.dtype).contiguous()
        probes = probes.to(torch.long).contiguous()
        n = q.shape[0]
        slots = torch.empty(n, k, dtype=torch.long)
        scores = torch.empty(n, k, dtype=self.keys.dtype)
        used = self.used()
        # every query's candidates, query after query: the scan scores into this scratch
        # (from torch's allocator, which reuses it) and then picks each query's best
        room = torch.where(probes >= 0, used[probes.clamp_min(0)], 0).sum(dim=1) * BLOCK
        scratch_at = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(room, 0, out=scratch_at[1:])
        total = int(scratch_at[-1])
        scratch = torch.empty(total, dtype=self.keys.dtype)
        status = lib.longrange_cells_search(
            _ptr(self.keys),
            _ptr(self.slots),
            _ptr(self.first),
            _ptr(used),
            ctypes.c_int64(self.cells),
            _ptr(q),
            _ptr(probes),
            ctypes.c_int64(n),
            ctypes.c_int64(probes.shape[1]),
            ctypes.c_int64(self.dim),
            ctypes.c_int64(k),
            _ptr(scratch),
            _ptr(scratch_at),
            _ptr(slots),
            _ptr(scores),
            ctypes.c_int(threads),
        )
        if status != 0:
            raise MemoryError("the kNN scan could not allocate its buffers")
        return slots, scores


def search_reference(lists: CellLists, queries: Tensor, probes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:meth:`CellLists.search` in torch ops: each probe's cell read whole (padded to the
    largest cell), the scores of all probes gathered, then one top-k; queries in blocks, so
    that a probe's gathered keys stay within about :data:`REFERENCE_BYTES`."""
    used = lists.used()
    width = max(1, int(used.max())) * BLOCK if len(used) else BLOCK
    rows = max(1, REFERENCE_BYTES // (width * lists.dim * lists.keys.element_size()))
    parts = [
        _reference_block(lists, queries[i : i + rows], probes[i : i + rows], k, width)
        for i in range(0, len(queries), rows)
    ]
    if not parts:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=lists.keys.dtype)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _reference_block(
    lists: CellLists, queries: Tensor, probes: Tensor, k: int, width: int
) -> tuple[Tensor, Tensor]:
    q = queries.to(lists.keys.dtype)
    used = lists.used()
    by_column = lists.keys.transpose(1, 2).reshape(-1, lists.dim)
    lanes = torch.arange(width)
    scores, slots = [], []
    for p in range(probes.shape[1]):
        cell = probes[:, p].clamp_min(0)
        column = lists.first[cell, None] * BLOCK + lanes  # [Q, W]
        inside = (lanes < used[cell, None] * BLOCK) & (probes[:, p, None] >= 0)
        column = torch.where(inside, column, 0)
        owner = torch.where(inside, lists.slots[column], -1)
        s = torch.einsum("qd,qwd->qw", q, by_column[column])
        scores.append(s.masked_fill(owner < 0, -torch.inf))
        slots.append(owner)
    scores, slots = torch.cat(scores, dim=1), torch.cat(slots, dim=1)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    best = slots.gather(1, top.indices).masked_fill(top.values == -torch.inf, -1)
    values = top.values
    if best.shape[1] < k:
        pad = k - best.shape[1]
        best = torch.cat((best, best.new_full((best.shape[0], pad), -1)), dim=1)
        values = torch.cat((values, values.new_full((values.shape[0], pad), -torch.inf)), dim=1)
    return best, values
