"""Batches for training and evaluation.

- :class:`RandomWindows`: random windows of ``seq_len + 1`` tokens from the concatenated
  training stream. Batch ``i`` depends only on (seed, rank, i), so the sampler's position is
  just the step counter and a resumed run sees exactly the batches it would have seen.
- :class:`DocumentChunks`: for families that carry state across segments. Each batch row reads
  its own sequence of whole documents in order, ``seq_len`` tokens at a time; ``new_doc``
  says which rows start a document (their state must be reset first).
- :func:`eval_chunks`: each validation document in order, in chunks, for bits per byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from longrange.data.corpus import Document

IGNORE_INDEX = -100


class RandomWindows:
    def __init__(
        self, stream: np.ndarray, *, seq_len: int, batch_size: int, seed: int, rank: int = 0
    ) -> None:
        if len(stream) < seq_len + 2:
            raise ValueError(
                f"training data has {len(stream)} tokens; need more than seq_len + 1 = {seq_len + 1}"
            )
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.rank = seed, rank

    def batch(self, index: int) -> Tensor:
        """Windows [B, seq_len + 1] (int64) for batch number ``index``."""
        rng = np.random.default_rng((self.seed, self.rank, index))
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, size=self.batch_size)
        rows = np.stack([self.stream[s : s + self.seq_len + 1] for s in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


@dataclass
class Chunk:
    inputs: Tensor  # [B, L] token ids
    targets: Tensor  # [B, L] next tokens, IGNORE_INDEX past a document's end
    new_doc: Tensor  # [B] bool: the row starts a new document with this chunk


class DocumentChunks:
    """Per-row document streams; each row walks its own shuffled order of documents."""

    def __init__(
        self, docs: list[Document], *, seq_len: int, batch_size: int, seed: int, rank: int = 0
    ) -> None:
        docs = [d for d in docs if len(d) >= 2]
        if not docs:
            raise ValueError("no training document has at least 2 tokens")
        self.docs, self.seq_len, self.batch_size = docs, seq_len, batch_size
        self.seed, self.rank = seed, rank
        self.cursor = [[row, 0, 0] for row in range(batch_size)]  # [epoch/slot, doc pos, offset]

    def _doc_for(self, row: int, slot: int) -> Document:
        rng = np.random.default_rng((self.seed, self.rank, row, slot // len(self.docs)))
        order = rng.permutation(len(self.docs))
        return self.docs[order[slot % len(self.docs)]]

    def next(self) -> Chunk:
        L = self.seq_len
        inputs = np.zeros((self.batch_size, L), dtype=np.int64)
        targets = np.full((self.batch_size, L), IGNORE_INDEX, dtype=np.int64)
        new_doc = np.zeros(self.batch_size, dtype=bool)
        for row, cur in enumerate(self.cursor):
            slot, offset = cur[1], cur[2]
            doc = self._doc_for(row, slot)
            if offset == 0:
                new_doc[row] = True
            piece = doc.tokens[offset : offset + L + 1].astype(np.int64)
            inputs[row, : len(piece) - 1] = piece[:-1]
            targets[row, : len(piece) - 1] = piece[1:]
            offset += L
            if offset >= len(doc) - 1:
                cur[1], cur[2] = slot + 1, 0
            else:
                cur[2] = offset
        return Chunk(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(new_doc))

    def state(self) -> dict:
        return {"cursor": [list(c) for c in self.cursor]}

    def load_state(self, state: dict) -> None:
        cursor = state.get("cursor")
        if not isinstance(cursor, list) or len(cursor) != self.batch_size:
            raise ValueError("sampler state does not match this batch size")
        self.cursor = [list(map(int, c)) for c in cursor]


def eval_chunks(
    docs: list[Document], seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[bool, Tensor, Tensor]]:
    """Yield (new_doc, inputs [1, L'], targets [1, L']) over each document in order.

    Chunk boundaries overlap by one token so every token after a document's first is
    predicted exactly once; ``max_tokens`` stops after that many predicted tokens.
    """
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in docs:
        tokens = torch.from_numpy(doc.tokens.astype(np.int64))
        for start in range(0, len(tokens) - 1, seq_len):
            if budget <= 0:
                return
            piece = tokens[start : start + seq_len + 1]
            take = int(min(len(piece) - 1, budget))
            yield start == 0, piece[None, :take], piece[None, 1 : take + 1]
            budget -= take
