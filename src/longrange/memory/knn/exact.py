"""Exact kNN search with torch: queries times every filled key, then top-k.

The reference for tests and the default on GPU. It keeps no structure of its own: slots
[0, min(count, M)) of each row are filled (writing is FIFO from slot 0 and clearing resets the
count), so a search reads the keys straight from the [R, M, 2, D] tensor it is given (the
store's memory-mapped view on CPU, a device copy on GPU).

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

# Score matrices are built for blocks of queries of at most this many elements, so a large
# memory never needs a Q x M matrix at once.
SCORE_BLOCK_ELEMENTS = 1 << 24


class ExactIndex(KNNIndex):
    name = "exact"

    def __init__(self, store: MemmapStore, kv: Tensor) -> None:
        super().__init__(store)
        self.kv = kv  # [R, M, 2, D]

    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, evicted: np.ndarray) -> None:
        pass  # the keys are already in ``kv``

    def reset(self, row: int) -> None:
        pass  # the store's count decides which slots are searched

    def search(self, rows: Sequence[int], queries: Tensor, k: int) -> Tensor:
        rows = list(rows)
        r, q = queries.shape[:2]
        filled = np.minimum(self.store.counts[rows], self.store.capacity)
        f = int(filled.max()) if len(rows) else 0
        if f == 0 or k == 0:
            return torch.full((r, q, k), -1, dtype=torch.long, device=queries.device)
        if rows == list(range(self.store.rows)):
            keys = self.kv[:, :f, 0]  # [R, F, D]
        else:
            keys = self.kv[torch.as_tensor(rows, device=self.kv.device), :f, 0]
        keys = keys.to(queries.device, queries.dtype)
        beyond = None  # [R, 1, F] slots past a row's fill, when rows are filled unequally
        if int(filled.min()) < f:
            short = torch.as_tensor(filled, device=queries.device)[:, None, None]
            beyond = torch.arange(f, device=queries.device)[None, None, :] >= short
        kk = min(k, f)
        block = max(1, SCORE_BLOCK_ELEMENTS // max(1, r * f))
        pieces = []
        for start in range(0, q, block):
            scores = torch.bmm(queries[:, start : start + block], keys.transpose(1, 2))  # [R, Qb, F]
            if beyond is not None:
                scores.masked_fill_(beyond, float("-inf"))
            top = scores.topk(kk, dim=-1)
            pieces.append(top.indices.masked_fill(top.values == float("-inf"), -1))
        return pad_slots(torch.cat(pieces, dim=1), k)
