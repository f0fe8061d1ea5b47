"""Exact kNN search with torch: queries times every filled key, then top-k.

The reference for tests, the default on GPU, and the small-memory half of the ``auto``
index. It keeps no structure of its own: slots [0, min(count, M)) of each row are filled
(writing is FIFO from slot 0 and clearing resets the count), so a search reads the keys
straight from the [R, M, D] key table it is given (the store's memory-mapped view on CPU, a
device copy on GPU).

Dimensions: R rows searched, Q queries per row, F filled slots (the largest row), D key width,
K neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from longrange.memory.knn.interface import KNNIndex, pad_slots
from longrange.memory.knn.store import MemmapStore
from longrange.ops.select import top_k

# Score matrices are built for blocks of queries of at most this many elements, so a large
# memory never needs a Q x M matrix at once.
SCORE_BLOCK_ELEMENTS = 1 << 24


def exact_search(keys: Tensor, filled: np.ndarray, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k inner products of queries [R, Q, D] against keys [R, >= F, D], row r holding
    ``filled[r]`` keys -> (slots [R, Q, K], -1 past a row's fill; scores [R, Q, K])."""
    r, q = queries.shape[:2]
    f = int(filled.max()) if len(filled) else 0
    if f == 0 or k == 0:
        return (
            torch.full((r, q, k), -1, dtype=torch.long, device=queries.device),
            torch.full((r, q, k), float("-inf"), device=queries.device),
        )
    keys = keys[:, :f].to(queries.device, queries.dtype)
    beyond = None  # [R, 1, F] slots past a row's fill, when rows are filled unequally
    if int(filled.min()) < f:
        short = torch.as_tensor(filled, device=queries.device)[:, None, None]
        beyond = torch.arange(f, device=queries.device)[None, None, :] >= short
    kk = min(k, f)
    block = max(1, SCORE_BLOCK_ELEMENTS // max(1, r * f))
    slots, scores = [], []
    for start in range(0, q, block):
        sim = torch.bmm(queries[:, start : start + block], keys.transpose(1, 2))  # [R, Qb, F]
        if beyond is not None:
            sim.masked_fill_(beyond, float("-inf"))
        values, indices = top_k(sim, kk)
        slots.append(indices.masked_fill(values == float("-inf"), -1))
        scores.append(values)
    return pad_slots(torch.cat(slots, dim=1), torch.cat(scores, dim=1), k)


class ExactIndex(KNNIndex):
    name = "exact"

    def __init__(self, store: MemmapStore, keys: Tensor) -> None:
        super().__init__(store)
        self.keys = keys  # [R, M, D]

    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        pass  # the keys are already in ``keys``

    def reset(self, row: int) -> None:
        pass  # the store's count decides which slots are searched

    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return search_rows(self.keys, self.store, list(rows), queries, k)


def search_rows(
    table: Tensor, store: MemmapStore, rows: list[int], queries: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """:func:`exact_search` of queries [R, Q, D] in the given rows of the key table [R', M, D]
    of ``store``, as one product (the exact backend's search; the ``auto`` index calls it too
    while every row searched is small, so that the two agree bit for bit)."""
    filled = np.minimum(store.counts[rows], store.capacity)
    keys = table[:, : int(filled.max()) if len(rows) else 0]
    if rows != list(range(store.rows)):
        keys = keys[torch.as_tensor(rows, device=keys.device)]
    return exact_search(keys, filled, queries, k)
