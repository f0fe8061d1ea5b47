"""The chunk flow of the Memorizing Transformer: state, retrieval, XL window and commit.

:func:`run_chunk` runs the next tokens of a chunk through the layers of a
:class:`~longrange.models.memorizing.MemorizingLM`: every layer attends over [its XL memory ;
the chunk so far], memorizing layers also over the pairs retrieved from their kNN memory.
The chunk's keys and values accumulate in a :class:`ChunkCache`; when the chunk is done
(a forward call ends, or decoding has filled ``max_seq_len`` tokens) :func:`commit` moves
them on: the last ``xl_max_memories`` entries of [XL ; chunk] become the layer's XL memory,
and the entries leaving it go into the kNN memory, after the chunk's own searches.

Document starts: with ``clear_memories_on_sos_token_id`` a start is the sos token's
position; with ``..._eos_...`` the position after the eos. Queries at or after a start (in
the same row) retrieve nothing; at the commit the row's kNN memory is cleared and only
entries from its latest start on are stored (in the kNN memory and in the XL window).

XL inputs (``xl_reproject``): the XL window keeps each layer's attention inputs instead of
its keys and values, and every chunk projects them with the current weights (Transformer-XL):
in training, stored keys/values were made with the weights of an earlier step. Entries
leaving the window are projected (current weights, no gradient) as they go to the kNN memory.
With unchanged weights both forms give the same outputs.

Memory shifts (ERNIE-Doc): memories are rotated by ``shift_*_memories_down`` before each
chunk, as the reference does, so layer i reads the XL memory written by layer i + shift.

Token shift (``shift_tokens``): half of each attention input's features come from the
position before (:func:`longrange.modules.shift.shift_tokens`), across chunk and decoding
boundaries through the state, and never across a document start or out of padding.

Dimensions: B batch, n new tokens, P earlier keys, M = P + n keys, H heads, D head width,
L XL length, C chunk length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from longrange.memory.knn import KNNMemoryList
from longrange.models.memorizing_layers import causal_bias, relative_bias
from longrange.modules.shift import shift_tokens

if TYPE_CHECKING:
    from longrange.models.memorizing import MemorizingLM


@dataclass
class ChunkCache:
    """Keys and values of the current chunk so far, and where documents start in it."""

    kv: list[Tensor | None]  # per layer [B, c, 2, D]
    # with xl_reproject, per XL layer: the attention inputs [B, c, C] (they become the XL
    # window) and the window's keys/values projected at the chunk's first call [B, L, 2, D]
    hidden: list[Tensor | None]
    xl_kv: list[Tensor | None]
    valid: Tensor  # [B, c] entries that are not padding
    started: Tensor  # [B] a document started in this chunk (queries after it retrieve nothing)
    last_start: Tensor  # [B] position of the latest start in this chunk (-1: none)
    pending: Tensor  # [B] the last token was an eos: the next position starts a document
    length: int = 0


@dataclass
class MemorizingState:
    """What outlives a chunk: one kNN memory per memorizing layer (B rows each), XL memories
    (one (kv [B, L, 2, D], valid [B, L]) per XL layer, or with ``xl_reproject`` (inputs
    [B, L, C], valid); None before the first chunk) and, while decoding, the current chunk's
    cache."""

    batch_size: int
    knn: KNNMemoryList
    xl: list[tuple[Tensor, Tensor]] | None = None
    cache: ChunkCache | None = None
    # with shift_tokens: per layer, the last normed input and whether it may shift forward
    # ((h [B, 1, C], keep [B, 1]); None before the first tokens)
    shift: list[tuple[Tensor, Tensor]] | None = None
    closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Remove the memory files now (they are also removed once the state is collected)."""
        if not self.closed:
            self.knn.cleanup()
        self.closed = True


def rotate(items: list, shift: int) -> list:
    if not items or not shift:
        return list(items)
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def _new_cache(depth: int, batch: int, device: torch.device) -> ChunkCache:
    no = torch.zeros(batch, dtype=torch.bool, device=device)
    return ChunkCache(
        [None] * depth,
        [None] * depth,
        [None] * depth,
        torch.ones(batch, 0, dtype=torch.bool, device=device),
        no,
        no.long() - 1,
        no,
    )


def _starts(model: MemorizingLM, tokens: Tensor, cache: ChunkCache | None) -> Tensor | None:
    """[B, n] True where a document starts (sos at the position, eos just before it)."""
    sos, eos = model.config.clear_memories_on_sos_token_id, model.config.clear_memories_on_eos_token_id
    if sos is None and eos is None:
        return None
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    if sos is not None:
        starts |= tokens == sos
    if eos is not None:
        starts[:, 1:] |= tokens[:, :-1] == eos
        if cache is not None:
            starts[:, 0] |= cache.pending
    return starts


def run_chunk(
    model: MemorizingLM,
    tokens: Tensor,
    mask: Tensor | None,
    state: MemorizingState | None,
    *,
    commit: bool = True,
    add_knn_memory: bool = True,
) -> Tensor:
    """Run tokens [B, n] (the next part of the current chunk); return logits [B, n, V].

    Without a state there is no memory and nothing is kept. With one, the chunk is committed
    when ``commit`` is set or the chunk reaches ``max_seq_len`` tokens.
    """
    c = model.config
    batch, n = tokens.shape
    device = tokens.device
    cache = None
    if state is not None:
        cache = state.cache if state.cache is not None else _new_cache(c.depth, batch, device)
    starts = _starts(model, tokens, cache)
    after_start = None  # [B, n] queries in a document that began inside this chunk
    if starts is not None:
        after_start = (starts.cumsum(dim=1) > 0) | cache_started(cache, batch, device)[:, None]
    memories = rotate(list(state.knn), c.shift_knn_memories_down) if state is not None else []
    xl_in = rotate(state.xl, c.shift_xl_memories_down) if state is not None and state.xl else []
    knn_iter, xl_iter = iter(memories), iter(xl_in)
    new_valid = mask if mask is not None else torch.ones(batch, n, dtype=torch.bool, device=device)
    biases: dict[tuple[bool, int], Tensor] = {}
    new_kv = []
    shift_keep = past_keep = None
    if c.shift_tokens:
        # a position may shift into the next one unless it is padding or the next one starts
        # a document
        shift_keep = new_valid.clone()
        if starts is not None:
            shift_keep[:, :-1] &= ~starts[:, 1:]
        past_keep = None if starts is None else ~starts[:, :1]
    new_shift = []
    hidden: list[tuple[int, Tensor]] = []  # (layer index, attention input) to keep for XL
    x = model.embed(tokens)
    for idx, block in enumerate(model.blocks):
        layer, attn = idx + 1, block.attn
        h = block.attn_norm(x)
        if c.shift_tokens:
            past = state.shift[idx] if state is not None and state.shift is not None else (None, None)
            keep = past[1] if past_keep is None or past[1] is None else past[1] & past_keep
            new_shift.append((h[:, -1:].detach(), shift_keep[:, -1:]))
            h = shift_tokens(h, (1, 0), shift_keep, past=past[0], past_mask=keep)
        q, k, v = attn.project(h)
        parts_k, parts_v, parts_valid = [], [], []
        xl = next(xl_iter, None) if layer in model.xl_layers else None
        if c.xl_reproject and state is not None and layer in model.xl_layers:
            hidden.append((idx, h))
        if xl is not None:
            xl_kv = xl[0]
            if c.xl_reproject:
                xl_kv = cache.xl_kv[idx]
                if xl_kv is None:  # the chunk's first call: project with the current weights
                    xl_kv = torch.stack(attn.project_kv(xl[0].to(h.dtype)), dim=-2)
                    cache.xl_kv[idx] = xl_kv.detach()  # later calls of the chunk reuse it
            parts_k.append(xl_kv[..., 0, :].to(k.dtype))
            parts_v.append(xl_kv[..., 1, :].to(v.dtype))
            parts_valid.append(xl[1])
        if cache is not None and cache.kv[idx] is not None:
            parts_k.append(cache.kv[idx][..., 0, :].to(k.dtype))
            parts_v.append(cache.kv[idx][..., 1, :].to(v.dtype))
            parts_valid.append(cache.valid)
        keys, values, key_valid = k, v, mask
        if parts_k:
            keys, values = torch.cat([*parts_k, k], dim=1), torch.cat([*parts_v, v], dim=1)
            key_valid = torch.cat([*parts_valid, new_valid], dim=1)
            key_valid = None if bool(key_valid.all()) else key_valid
        m = keys.shape[1]
        if (attn.knn, m) not in biases:  # shared by the layers of a kind: built once per chunk
            table = model.knn_rel_pos if attn.knn else model.rel_pos
            biases[(attn.knn, m)] = causal_bias(relative_bias(table, n, m), n, m, device=device)
        bias = biases[(attn.knn, m)]
        if attn.knn:
            memory = next(knn_iter, None)
            retrieved = None
            if memory is not None and attn.num_retrieved_memories and bool(memory.db_offsets.any()):
                mem_k, mem_v, found = memory.retrieve(q, attn.num_retrieved_memories)
                if after_start is not None:
                    found = found & ~after_start[:, None, :, None]
                retrieved = (mem_k, mem_v, found)
            out = attn.attend(q, keys, values, key_valid, bias, retrieved)
        else:
            out = attn.attend(q, keys, values, key_valid, bias)
        x = x + out
        x = x + block.ff(block.ff_norm(x))
        new_kv.append(torch.stack([k, v], dim=-2).detach())
    logits = model.head(model.norm(x))
    if state is None:
        return logits
    if c.shift_tokens:
        eos = c.clear_memories_on_eos_token_id
        if eos is not None:  # the next position starts a document: nothing shifts into it
            new_shift = [(h, keep & (tokens[:, -1:] != eos)) for h, keep in new_shift]
        state.shift = new_shift
    for idx, kv in enumerate(new_kv):
        cache.kv[idx] = kv if cache.kv[idx] is None else torch.cat([cache.kv[idx], kv], dim=1)
    for idx, h in hidden:
        h = h.detach()
        cache.hidden[idx] = h if cache.hidden[idx] is None else torch.cat([cache.hidden[idx], h], dim=1)
    cache.valid = torch.cat([cache.valid, new_valid], dim=1)
    if starts is not None:
        positions = torch.arange(cache.length, cache.length + n, device=device)
        latest = torch.where(starts, positions, -1).amax(dim=1)
        cache.last_start = torch.maximum(cache.last_start, latest)
        cache.started = cache.started | starts.any(dim=1)
        eos = c.clear_memories_on_eos_token_id
        cache.pending = tokens[:, -1] == eos if eos is not None else cache.pending
    cache.length += n
    state.cache = cache
    if commit or cache.length >= c.max_seq_len:
        commit_chunk(model, state, add_knn_memory=add_knn_memory)
    return logits


def cache_started(cache: ChunkCache | None, batch: int, device: torch.device) -> Tensor:
    if cache is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return cache.started


def commit_chunk(model: MemorizingLM, state: MemorizingState, *, add_knn_memory: bool = True) -> None:
    """Move the cached chunk into the XL windows and the kNN memories; clear the cache."""
    c, cache = model.config, state.cache
    if cache is None or cache.length == 0:
        state.cache = None
        return
    size = cache.length
    started = cache.started | cache.pending
    last_start = torch.where(cache.pending, size, cache.last_start)
    # Entries before a row's latest document start are dropped (rows with no start keep all).
    cut = torch.where(started, last_start, torch.iinfo(torch.long).min)
    clear_rows = started.nonzero().flatten().tolist()
    memories = iter(rotate(list(state.knn), c.shift_knn_memories_down))
    xl_in = iter(rotate(state.xl, c.shift_xl_memories_down) if state.xl else [])
    new_xl = []
    for idx, block in enumerate(model.blocks):
        layer, attn = idx + 1, block.attn
        # with xl_reproject an XL layer's entries are its attention inputs, projected below
        # (with the current weights) only as they go to the kNN memory
        inputs = c.xl_reproject and layer in model.xl_layers
        entries, valid = cache.hidden[idx] if inputs else cache.kv[idx], cache.valid
        xl = next(xl_in, None) if layer in model.xl_layers else None
        if xl is not None:
            entries = torch.cat([xl[0].to(entries.dtype), entries], dim=1)
            valid = torch.cat([xl[1], valid], dim=1)
        positions = torch.arange(size - entries.shape[1], size, device=entries.device)
        valid = valid & (positions[None, :] >= cut[:, None])
        keep = attn.xl_max_memories
        if keep:
            new_xl.append((entries[:, -keep:], valid[:, -keep:]))
            entries, valid = entries[:, :-keep], valid[:, :-keep]
        if attn.knn:
            memory = next(memories)
            if clear_rows:
                memory.clear(clear_rows)
            if add_knn_memory and entries.shape[1] and bool(valid.any()):
                if inputs:
                    with torch.no_grad():
                        entries = torch.stack(attn.project_kv(entries), dim=-2)
                memory.add(entries, None if bool(valid.all()) else valid)
    state.xl = new_xl if model.xl_layers else None
    state.cache = None
