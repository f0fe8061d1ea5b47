"""The kNN memory as opaque operators, for models traced by ``torch.compile``.

A memory's work happens on the host: faiss searches, numpy writes into memory-mapped
files, per-row counters. ``torch.compile`` cannot trace that, so a compiled graph calls it
through three ``torch.library`` custom operators, each naming its memory by a handle: an
integer held in a 0-d tensor (``memory.op_handle``, see :func:`register`), so that a graph
takes it as an input and serves every memory (a Python integer would be baked into the graph,
and each fresh memory would compile it again). The outputs have static shapes:

- ``longrange::knn_retrieve(queries [B, ..., D], handle, k)`` -> scores and found
  [B, ..., K] and the found pairs' keys and values, gathered [B * ... * K, D] (a graph
  cannot keep a view of the memory's tables: a later add in the same graph rewrites them);
- ``longrange::knn_add(pairs [B, N, 2, D], mask [B, N] or None, handle)``;
- ``longrange::knn_clear(rows [B] bool, handle)``.

All three are registered as ordered effects, so a compiled graph keeps them in program order
(a search before the add of the chunk that made it) and never drops them as unused.

:func:`retrieve`, :func:`add` and :func:`clear` are what the model calls: the operators
inside a compiled graph, the memory's methods in eager mode, and for a
:class:`~longrange.memory.knn.scratch.ScratchMemory` (a compiled call's own memory) its
tensor operations.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

_MEMORIES: dict[int, weakref.ref] = {}
_NEXT = itertools.count(1)


def register(memory) -> int:
    """Give ``memory`` the integer that names it to the operators, as ``memory.op_handle`` (a
    0-d int64 tensor)."""
    handle = next(_NEXT)
    memory.op_handle = torch.tensor(handle)
    _MEMORIES[handle] = weakref.ref(memory)
    weakref.finalize(memory, _MEMORIES.pop, handle, None)
    return handle


def _memory(handle: Tensor):
    handle = int(handle)
    memory = _MEMORIES.get(handle, lambda: None)()
    if memory is None:
        raise ValueError(f"the kNN memory of handle {handle} no longer exists")
    return memory


@torch.library.custom_op("longrange::knn_retrieve", mutates_args=())
def _retrieve(queries: Tensor, handle: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    memory = _memory(handle)
    ids, scores, found = memory.lookup(queries, k)
    flat = ids.reshape(-1).to(memory.key_table().device)
    keys = memory.key_table().index_select(0, flat).to(queries.device)
    values = memory.value_table().index_select(0, flat).to(queries.device)
    return scores, found, keys, values


@_retrieve.register_fake
def _(queries: Tensor, handle: Tensor, k: int):
    lead = (*queries.shape[:-1], k)
    rows = (queries[..., 0].numel() * k, queries.shape[-1])
    return (
        queries.new_empty(lead, dtype=torch.float32),
        queries.new_empty(lead, dtype=torch.bool),
        queries.new_empty(rows, dtype=torch.float32),
        queries.new_empty(rows, dtype=torch.float32),
    )


@torch.library.custom_op("longrange::knn_add", mutates_args=())
def _add(pairs: Tensor, mask: Tensor | None, handle: Tensor) -> None:
    add(_memory(handle), pairs, mask)


@_add.register_fake
def _(pairs: Tensor, mask: Tensor | None, handle: Tensor) -> None:
    return None


@torch.library.custom_op("longrange::knn_clear", mutates_args=())
def _clear(rows: Tensor, handle: Tensor) -> None:
    clear(_memory(handle), rows)


@_clear.register_fake
def _(rows: Tensor, handle: Tensor) -> None:
    return None


for _op in (_retrieve, _add, _clear):
    torch.library._register_effectful_op(_op._qualname, torch.library.EffectType.ORDERED)


def retrieve(memory, queries: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ids, scores, found [..., K], key table, value table) of queries [B, ..., D]: inside a
    compiled graph the gathered pairs (ids numbering them), else the memory's own tables."""
    if getattr(memory, "in_graph", False):  # a ScratchMemory: tensors all the way
        return (*memory.lookup(queries, k), memory.key_table(), memory.value_table())
    if torch.compiler.is_compiling():
        scores, found, keys, values = torch.ops.longrange.knn_retrieve(queries.detach(), memory.op_handle, k)
        ids = torch.arange(keys.shape[0], device=keys.device).view(found.shape)
        return ids, scores, found, keys, values
    ids, scores, found = memory.lookup(queries, k)
    return ids, scores, found, memory.key_table(), memory.value_table()


def add(memory, pairs: Tensor, mask: Tensor | None) -> None:
    """Add pairs [B, N, 2, D] (mask [B, N]: which to store; None: all)."""
    if getattr(memory, "in_graph", False):
        memory.add(pairs, mask)
    elif torch.compiler.is_compiling():
        torch.ops.longrange.knn_add(pairs, mask, memory.op_handle)
    elif mask is None or bool(mask.any()):
        memory.add(pairs, None if mask is None or bool(mask.all()) else mask)


def clear(memory, rows: Tensor) -> None:
    """Clear the rows where ``rows`` [B] is True."""
    if getattr(memory, "in_graph", False):
        memory.clear(rows)
        return
    if torch.compiler.is_compiling():
        torch.ops.longrange.knn_clear(rows, memory.op_handle)
        return
    chosen = rows.nonzero().flatten().tolist()
    if chosen:
        memory.clear(chosen)
