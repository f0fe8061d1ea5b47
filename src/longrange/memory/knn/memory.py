"""``KNNMemory`` and ``KNNMemoryList``: the memorizing-transformers-pytorch names on our store.

A :class:`KNNMemory` holds, for each of ``num_indices`` batch rows, up to ``max_memories``
(key, value) pairs of width ``dim`` in a memory-mapped file, plus an index over the keys
(``backend``: exact torch search or faiss, see ``interface.py``). ``add`` appends pairs per
row (FIFO: the oldest are evicted first, and a retrieved value is always the one stored with
its key), ``search`` returns the top-k pairs per query with a validity mask, ``clear`` forgets
rows, ``save`` / ``load`` persist it, ``close`` (alias ``cleanup``) removes its files.

Differences from the reference, on purpose: wrap-around keeps keys and values matched (the
reference re-numbered its faiss ids after wiping the whole index); ``clear`` touches only the
rows it is given; closing deletes the files; with no ``memmap_filename`` the file goes into a
fresh temporary directory (marked with its owner, see ``store.py``) rather than the working
directory; a directory is locked against other processes. A saved list re-opens as a new
list in a fresh folder (:meth:`KNNMemoryList.open_saved`), which is how a model state that
holds memories loads. The reference's search-statistics arguments (``increment_hits``,
``increment_age``) are accepted: it keeps no statistics by default, and neither do we.

Dimensions: B rows in scope, N entries per row, Q queries per row, K neighbours, D width.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from longrange.atomic import atomic_write_json, fsync_directory
from longrange.checks import positive_int
from longrange.memory.knn import compiled
from longrange.memory.knn.factory import make_index, resolve_backend
from longrange.memory.knn.retrieval import TableLease
from longrange.memory.knn.store import (
    MemmapStore,
    claim_file,
    lock_directory,
    make_memory_directory,
    prepare_directory,
    release_file,
    remove_memory_directory,
    unlock_directory,
)

SAVE_DATA = "knn.memory.memmap"
SAVE_META = "knn.memory.json"
SAVE_FORMAT = "longrange-knn-memory-2"  # data [2, R, M, D]: keys, then values
OLD_FORMAT = "longrange-knn-memory-1"  # data [R, M, 2, D]; still read
DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY = None  # None: a fresh temporary directory per memory list


def row_indices(name: str, value, rows: int) -> list[int]:
    """Batch row indices given as an int or a sequence / array / tensor of ints, each in
    [0, rows); a bool (a mask: which rows?) or a float is refused rather than cast."""
    if isinstance(value, (Tensor, np.ndarray)):
        if isinstance(value, Tensor):
            dtype = value.dtype
            integral = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        else:
            integral = value.dtype.kind in "iu"
        if not integral:
            raise TypeError(
                f"{name} must be indices (an int or a sequence of ints), got a {value.dtype} "
                "array; for a mask pass mask.nonzero().flatten()"
            )
        value = value.tolist()
    if isinstance(value, (int, np.integer, str, bytes)) or not hasattr(value, "__iter__"):
        items = [value]
    else:
        items = list(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"{name} must be indices (an int or a sequence of ints), got {value!r}")
    chosen = [int(i) for i in items]
    bad = [i for i in chosen if not 0 <= i < rows]
    if bad:
        raise ValueError(f"{name} must lie in [0, {rows}), got {bad}")
    return chosen


def _release(store: MemmapStore, path: Path, directory: Path, remove_directory: bool) -> None:
    store.close()
    with contextlib.suppress(OSError):
        path.unlink()
    release_file(path)
    unlock_directory(directory)
    if remove_directory:
        remove_memory_directory(directory)  # stays while other memories use it; the last one removes it


class KNNMemory:
    """kNN memory of ``num_indices`` rows x ``max_memories`` (key, value) pairs of width ``dim``.

    Keyword-only extras: ``backend`` ("auto", "exact", "faiss"), ``index`` ("auto": exact
    while small, an inverted file beyond; "flat", "hnsw", "ivf": one faiss index kind),
    ``index_options`` (auto: exact_limit, cells_per_root, nprobe, train_points; flat / hnsw /
    ivf: hnsw_m, ef_search, ef_construction, nlist, nprobe, train_size), ``device`` (where
    searches run for the exact backend and where results are returned), ``remove_directory``
    (delete the file's directory on close when empty).
    """

    def __init__(
        self,
        dim: int,
        max_memories: int = 16000,
        num_indices: int = 1,
        memmap_filename: str | os.PathLike | None = None,
        multiprocessing: bool = True,
        *,
        backend: str = "auto",
        index: str = "auto",
        index_options: dict | None = None,
        device: torch.device | str | None = None,
        remove_directory: bool = False,
    ) -> None:
        self.dim = positive_int("dim", dim)
        self.max_memories = positive_int("max_memories", max_memories)
        self.num_indices = positive_int("num_indices", num_indices)
        if not isinstance(multiprocessing, bool):
            raise TypeError(f"multiprocessing must be a bool, got {multiprocessing!r}")
        self.device = torch.device(device if device is not None else "cpu")
        self.backend = resolve_backend(backend, self.device)
        self.shape = (num_indices, max_memories, 2, dim)
        # what a saved copy needs to be re-opened alike (open_saved)
        self.options = {"multiprocessing": multiprocessing, "index_options": dict(index_options or {})}
        if memmap_filename is None:
            directory = make_memory_directory()
            path, remove_directory = directory / SAVE_DATA, True
        else:
            path = Path(memmap_filename)
            directory = prepare_directory(path.parent)
            path = directory / path.name
        lock_directory(directory)
        try:
            claim_file(path)
        except ValueError:
            unlock_directory(directory)
            raise
        try:
            store = MemmapStore(path, num_indices, max_memories, dim)
        except OSError as err:
            release_file(path)
            unlock_directory(directory)
            raise ValueError(f"cannot create the kNN memory file {str(path)!r}: {err}") from None
        self.store, self.path, self.directory = store, path, directory
        self.owns_directory = remove_directory
        self._finalizer = weakref.finalize(self, _release, store, path, directory, remove_directory)
        # Where pairs are gathered from: the file itself on CPU, a device copy elsewhere.
        if self.device.type == "cpu":
            self._keys, self._values = store.keys(), store.values()
        else:
            self._keys = torch.zeros(num_indices, max_memories, dim, device=self.device)
            self._values = torch.zeros_like(self._keys)
        threads = (os.cpu_count() or 1) if multiprocessing else 1
        self.index = make_index(
            self.backend,
            store,
            keys=self._keys,
            kind=index,
            device=self.device,
            options=index_options,
            threads=threads,
        )
        self.index_kind = index
        self.scoped_indices = list(range(num_indices))
        self._leases: weakref.WeakSet[TableLease] = weakref.WeakSet()
        compiled.register(self)  # op_handle: how compiled graphs name this memory

    # --- reference-compatible surface -----------------------------------------------------
    @property
    def db(self) -> np.ndarray:
        """The pairs as the reference's [rows, max_memories, 2, dim] array (a view of the
        memory-mapped file)."""
        self._check_open()
        return self.store.db

    @property
    def db_offsets(self) -> np.ndarray:
        """Entries written per row since its last clear (the next entry id)."""
        return self.store.counts

    def set_scoped_indices(self, indices: Iterable[int]) -> None:
        indices = row_indices("batch indices", indices, self.num_indices)
        if len(set(indices)) != len(indices):
            raise ValueError(f"scoped batch indices must be unique, got {indices}")
        self.scoped_indices = indices

    @contextmanager
    def at_batch_indices(self, indices: Iterable[int]):
        previous = self.scoped_indices
        self.set_scoped_indices(indices)
        try:
            yield self
        finally:
            self.scoped_indices = previous

    def clear(self, batch_indices: int | Sequence[int] | None = None) -> None:
        """Forget the given rows (all rows when None); the other rows are untouched."""
        self._check_open()
        if batch_indices is None:
            rows = list(range(self.num_indices))
        else:
            rows = row_indices("batch_indices", batch_indices, self.num_indices)
        for row in rows:
            self.store.clear(row)
            self.index.reset(row)

    def add(self, memories: Tensor, mask: Tensor | None = None) -> None:
        """Append ``memories`` [B, N, 2, D] (keys, values) to the rows in scope.

        ``mask`` [B, N] (bool, True = store) skips entries per row, e.g. padding.
        """
        self._check_open()
        rows = self.scoped_indices
        if memories.dim() != 4 or memories.shape[0] != len(rows) or memories.shape[2:] != (2, self.dim):
            raise ValueError(
                f"memories must have shape (batch={len(rows)}, n, 2, dim={self.dim}), "
                f"got {tuple(memories.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != memories.shape[:2]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(memories.shape[:2])}")
        memories = memories.detach()
        host = memories.to("cpu", torch.float32).numpy()
        keep = None if mask is None else mask.detach().cpu().numpy()
        items = []
        for i, row in enumerate(rows):
            entries = host[i] if keep is None else host[i][keep[i]]
            self._before_write(row * self.max_memories + self.store.next_slots(row, len(entries)))
            ids, evicted = self.store.write(row, entries)
            if ids.size and self.device.type != "cpu":
                fresh = (memories[i] if keep is None else memories[i][mask[i]])[-ids.size :]
                slots = torch.as_tensor(ids % self.max_memories, device=self.device)
                self._keys[row, slots] = fresh[:, 0].to(self.device, torch.float32)
                self._values[row, slots] = fresh[:, 1].to(self.device, torch.float32)
            items.append((row, ids, entries[len(entries) - ids.size :, 0], evicted))
        if hasattr(self.index, "add_rows"):
            self.index.add_rows(items)
        else:
            for item in items:
                self.index.add(*item)

    def search(
        self,
        queries: Tensor,
        topk: int,
        nprobe: int | None = None,
        increment_hits: bool = True,
        increment_age: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """queries [B, ..., D] -> (pairs [B, ..., K, 2, D] float32, mask [B, ..., K] bool).

        Missing neighbours (fewer than K alive entries) are zero pairs with mask False.
        ``nprobe`` sets the lists searched by an IVF index for this call.
        """
        keys, values, mask = self.retrieve(queries, topk, nprobe=nprobe)
        return torch.stack([keys, values], dim=-2), mask

    def retrieve(
        self, queries: Tensor, topk: int, *, nprobe: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Like :meth:`search`, with keys and values apart: ([B, ..., K, D], [B, ..., K, D], mask)."""
        ids, _, mask = self.lookup(queries, topk, nprobe=nprobe)
        lead = (*ids.shape, self.dim)
        flat = ids.to(self._keys.device).flatten()
        keys = self.key_table().index_select(0, flat).view(lead)
        values = self.value_table().index_select(0, flat).view(lead)
        dev = mask.to(keys.device)
        if not bool(dev.all()):
            keys.masked_fill_(~dev[..., None], 0.0)
            values.masked_fill_(~dev[..., None], 0.0)
        return keys.to(queries.device), values.to(queries.device), mask

    def lookup(
        self, queries: Tensor, topk: int, *, nprobe: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The top-k entries of each query, as rows of :meth:`key_table` / :meth:`value_table`:
        queries [B, ..., D] -> (ids [B, ..., K] int64, 0 where nothing was found; scores
        [B, ..., K] float32, the inner products, -inf where nothing was found; found mask
        [B, ..., K] bool), on the queries' device."""
        self._check_open()
        rows = self.scoped_indices
        if queries.dim() < 2 or queries.shape[0] != len(rows) or queries.shape[-1] != self.dim:
            raise ValueError(
                f"queries must have shape (batch={len(rows)}, ..., dim={self.dim}), "
                f"got {tuple(queries.shape)}"
            )
        if not isinstance(topk, int) or topk < 0:
            raise ValueError(f"topk must be a non-negative integer, got {topk!r}")
        lead = (len(rows), *queries.shape[1:-1], topk)
        flat = queries.detach().reshape(len(rows), -1, self.dim).float()
        if self.backend == "exact":
            flat = flat.to(self.device)
        if nprobe is not None and self.index_kind == "ivf":
            self.index.nprobe = positive_int("nprobe", nprobe)
            for index in self.index.indexes:
                if hasattr(index, "nprobe"):
                    index.nprobe = nprobe
        slots, scores = self.index.search(rows, flat, topk)  # [B, Q, K]
        found = slots >= 0
        row_ids = torch.as_tensor(rows, device=slots.device)[:, None, None]
        ids = (row_ids * self.max_memories + slots.clamp_min(0)).masked_fill(~found, 0)
        device = queries.device
        return ids.view(lead).to(device), scores.view(lead).to(device), found.view(lead).to(device)

    def lease(self, ids: Tensor) -> TableLease:
        """A lease on the table rows ``ids`` (from :meth:`lookup`): until it is collected, it
        receives the old pair of each of them that the memory overwrites (see
        ``retrieval.py``)."""
        lease = TableLease(self.num_indices * self.max_memories, ids)
        self._leases.add(lease)
        return lease

    def _before_write(self, slots: np.ndarray) -> None:
        if slots.size and self._leases:
            for lease in list(self._leases):
                lease.before_write(slots, self.key_table(), self.value_table())

    def key_table(self) -> Tensor:
        """Every row's keys as one [rows * max_memories, dim] table (the file's memory on CPU,
        no copy); :meth:`lookup` ids index it."""
        self._check_open()
        return self._keys.view(-1, self.dim)

    def value_table(self) -> Tensor:
        """Every row's values as one [rows * max_memories, dim] table, like :meth:`key_table`."""
        self._check_open()
        return self._values.view(-1, self.dim)

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the pairs, the counters and the index into ``directory``."""
        self._check_open()
        target = prepare_directory(directory)
        data = target / SAVE_DATA
        if data.resolve() == self.path.resolve():
            raise ValueError(f"cannot save a kNN memory onto its own file {str(self.path)!r}")
        # the metadata is written last and vouches for the rest: drop an earlier save's first,
        # so a save that dies half way leaves no saved memory, never old counts beside new pairs
        (target / SAVE_META).unlink(missing_ok=True)
        fsync_directory(target)
        self.store.flush()
        tmp = target / (SAVE_DATA + ".tmp")
        shutil.copyfile(self.path, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, data)
        self.index.save(target)
        meta = {
            "format": SAVE_FORMAT,
            "shape": list(self.shape),
            "dtype": "float32",
            "counts": [int(c) for c in self.store.counts],
            "backend": self.backend,
            "index": self.index_kind,
            **self.options,
        }
        atomic_write_json(target / SAVE_META, meta)

    def load(self, directory: str | os.PathLike) -> None:
        """Replace this memory's contents with those saved in ``directory``.

        The saved shape and dtype must equal this memory's; a corrupt or foreign directory
        raises ValueError and leaves this memory unchanged.
        """
        self._check_open()
        source = Path(directory)
        meta_path, data_path = source / SAVE_META, source / SAVE_DATA
        if not meta_path.is_file() or not data_path.is_file():
            raise ValueError(f"{str(source)!r} holds no saved kNN memory (needs {SAVE_META} and {SAVE_DATA})")
        try:
            meta = json.loads(meta_path.read_text())
            shape, dtype, counts = tuple(meta["shape"]), meta["dtype"], [int(c) for c in meta["counts"]]
            if meta.get("format") not in (SAVE_FORMAT, OLD_FORMAT):
                raise ValueError(f"unknown format {meta.get('format')!r}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"corrupt kNN memory metadata {str(meta_path)!r}: {err}") from None
        if shape != self.shape or dtype != "float32":
            raise ValueError(
                f"saved kNN memory has shape {shape} and dtype {dtype}; this memory needs "
                f"{self.shape} and float32"
            )
        if len(counts) != self.num_indices or any(c < 0 for c in counts):
            raise ValueError(f"corrupt kNN memory metadata {str(meta_path)!r}: bad counts {counts}")
        expected = int(np.prod(self.shape)) * 4
        if data_path.stat().st_size != expected:
            raise ValueError(
                f"corrupt kNN memory data {str(data_path)!r}: {data_path.stat().st_size} bytes, "
                f"expected {expected}"
            )
        self._before_write(np.arange(self.num_indices * self.max_memories))
        if meta["format"] == OLD_FORMAT:
            saved = np.memmap(data_path, mode="r", dtype=np.float32, shape=self.shape).transpose(2, 0, 1, 3)
        else:
            saved = np.memmap(data_path, mode="r", dtype=np.float32, shape=self.store.data.shape)
        self.store.data[:] = saved
        del saved
        self.store.counts[:] = counts
        if self.device.type != "cpu":
            self._keys.copy_(self.store.keys())
            self._values.copy_(self.store.values())
        self.index.load(source)

    # --- lifetime -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this kNN memory has been closed (cleanup removed its files)")

    def close(self) -> None:
        """Delete the memory's file, release the directory lock; the memory is unusable after."""
        if self._finalizer.alive:
            self.index.close()
            self._keys = self._values = None
            self._finalizer()

    cleanup = close

    def __enter__(self) -> KNNMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce_ex__(self, protocol):
        # A copy would share (or, once the original closes, lose) this memory's file and
        # index: copy.deepcopy used to return a memory that read as closed, pickle failed
        # on a weak reference deep inside.
        raise TypeError(
            "a KNNMemory is backed by its own file and cannot be copied or pickled: save() it "
            "and open the saved copy (KNNMemoryList.open_saved, or a model's save_state / load_state)"
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"file={str(self.path)!r}"
        return (
            f"KNNMemory(dim={self.dim}, max_memories={self.max_memories}, num_indices={self.num_indices}, "
            f"backend={self.backend!r}, index={self.index_kind!r}, {state})"
        )
