"""A kNN memory made of tensors, for the one call of a compiled graph that keeps no state.

A memorizing call given no state runs on a scratch state whose kNN memories live for that
call only. In eager mode they are file-backed memories like any other; a compiled graph can
create neither files nor faiss indexes, so it uses this instead: keys and values held as
tensors and grown by concatenation (their shapes depend only on the call's length), an exact
search by a matmul and a top-k, and entries that are not stored (padding, the rows cleared
at a document start) kept as invalid instead of dropped, so that no shape depends on the data.
Results equal the exact backend's as long as a call holds fewer than ``capacity`` entries
per row (past it, the oldest are dropped by position, invalid ones included).

Dimensions: B rows, F entries held, Q queries per row, K neighbours, D key width.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ScratchMemory:
    """The part of :class:`~longrange.memory.knn.KNNMemory` a model's chunks use (``lookup``,
    ``add``, ``clear``, the tables), on tensors."""

    in_graph = True

    def __init__(self, batch: int, dim: int, capacity: int, like: Tensor) -> None:
        self.num_indices, self.dim, self.max_memories = batch, dim, capacity
        self.keys = like.new_zeros(batch, 0, dim, dtype=torch.float32)
        self.values = like.new_zeros(batch, 0, dim, dtype=torch.float32)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=like.device)

    def lookup(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """queries [B, ..., D] -> (ids [B, ..., K] into the tables, scores, found)."""
        b, f = self.num_indices, self.keys.shape[1]
        lead = (*queries.shape[:-1], k)
        q = queries.detach().reshape(b, -1, self.dim).float()
        if f == 0 or k == 0:
            empty = q.new_zeros(lead)
            return empty.long(), empty.fill_(float("-inf")), empty.bool()
        sim = torch.bmm(q, self.keys.transpose(1, 2)).masked_fill(~self.valid[:, None, :], float("-inf"))
        top = sim.topk(min(k, f), dim=-1)
        found = top.values > float("-inf")
        ids = (top.indices + torch.arange(b, device=q.device)[:, None, None] * f).masked_fill(~found, 0)
        scores = top.values
        if k > f:
            pad = (0, k - f)
            ids = torch.nn.functional.pad(ids, pad)
            scores = torch.nn.functional.pad(scores, pad, value=float("-inf"))
            found = torch.nn.functional.pad(found, pad)
        return ids.view(lead), scores.view(lead), found.view(lead)

    def key_table(self) -> Tensor:
        return self.keys.reshape(-1, self.dim)

    def value_table(self) -> Tensor:
        return self.values.reshape(-1, self.dim)

    def add(self, pairs: Tensor, mask: Tensor | None = None) -> None:
        """Append pairs [B, N, 2, D] (``mask`` [B, N]: which are stored)."""
        pairs = pairs.detach().float()
        keep = torch.ones(pairs.shape[:2], dtype=torch.bool, device=pairs.device) if mask is None else mask
        self.keys = torch.cat([self.keys, pairs[:, :, 0]], dim=1)[:, -self.max_memories :]
        self.values = torch.cat([self.values, pairs[:, :, 1]], dim=1)[:, -self.max_memories :]
        self.valid = torch.cat([self.valid, keep], dim=1)[:, -self.max_memories :]

    def clear(self, rows: Tensor) -> None:
        """Forget the rows where ``rows`` [B] is True."""
        self.valid = self.valid & ~rows[:, None]

    def close(self) -> None:
        pass
