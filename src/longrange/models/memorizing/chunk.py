"""One chunk of the Memorizing Transformer: its pieces through the layers, then its commit.

The functions take the model (a ``MemorizingLM``) as their first argument.

:func:`run_piece` runs the next tokens of a chunk (a piece of the segment flow,
``models/flow.py``) through the layers: every layer attends over [its XL window ; the chunk
so far ; the piece], memorizing layers also over the pairs retrieved from their kNN memory;
:func:`record_piece` adds the piece's keys and values to the open chunk. When the chunk is
done (it reaches ``max_seq_len`` tokens, or a forward call ends) :func:`commit_chunk` moves
it on:
the last ``xl_max_memories`` entries of [window ; chunk] become the layer's window, and the
entries leaving it go into the kNN memory, after the chunk's own searches.

The state's entries (docs/ARCHITECTURE.md, "State"): per layer ``open`` (the chunk's keys
and values [2, B, c, D], detached), an XL layer's window ``xl`` ([2, B, L, D], or with
``xl_reproject`` its inputs [B, L, C] beside ``open_inputs`` [B, c, C] and ``xl_kv``, the
window projected at the chunk's first piece), ``shift`` (token shift: the last normalised
input [B, 1, C]); shared ``knn`` (the memories; None in the scratch state of a call that keeps
nothing), ``xl_mask`` / ``open_mask`` (None = all real), ``shift_keep`` [B, 1], and the
chunk's document starts ``doc_started`` / ``doc_last_start`` / ``doc_pending``.

Document starts: with ``clear_memories_on_sos_token_id`` a start is the sos token's
position; with ``..._eos_...`` the position after the eos. Queries at or after a start (in
the same row) retrieve nothing; at the commit the row's kNN memory is cleared and only
entries from its latest start on are stored (in the kNN memory and in the XL window).

XL inputs (``xl_reproject``): every chunk projects the kept inputs with the current weights
(Transformer-XL): in training, stored keys/values were made with the weights of an earlier
step. Entries leaving the window are projected (current weights, no gradient) as they go to
the kNN memory. With unchanged weights both forms give the same outputs.

Memory shifts (ERNIE-Doc): memories are rotated by ``shift_*_memories_down``, as the
reference does, so layer i reads the XL window written by layer i + shift (``xl_source``)
and the kNN memory of memorizing layer i + shift (``knn_source``).

Token shift (``shift_tokens``): half of each attention input's features come from the
position before (:func:`longrange.modules.shift.shift_tokens`), across chunk and decoding
boundaries through the state, and never across a document start or out of padding.

Dimensions: B batch, n piece tokens, c chunk tokens so far, M keys, H heads, D head width,
L XL length, C model width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.memory.knn import compiled as knn_ops
from longrange.memory.knn.retrieval import Retrieved
from longrange.memory.xl import XLMemory, cat_masks, hide_rows
from longrange.models.flow import Piece, SegmentedLM, layer_entry
from longrange.models.memorizing.layers import Attention, relative_bias_values
from longrange.models.state import State
from longrange.modules.shift import shift_tokens
from longrange.ops.dense.bias import ToeplitzBias

LONG_MIN = torch.iinfo(torch.long).min


def document_starts(model: SegmentedLM, tokens: Tensor, pending: Tensor) -> Tensor | None:
    """[B, n] True where a document starts (the sos at the position, an eos just before it;
    ``pending`` [B]: the chunk's last token so far was an eos); None without the tokens."""
    sos, eos = model.config.clear_memories_on_sos_token_id, model.config.clear_memories_on_eos_token_id
    if sos is None and eos is None:
        return None
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    if sos is not None:
        starts |= tokens == sos
    if eos is not None:
        starts[:, 1:] |= tokens[:, :-1] == eos
        starts[:, 0] |= pending
    return starts


def shift_masks(valid: Tensor, starts: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Token shift: [B, n] whether a position may shift into the next one (not padding, and
    the next one starts no document), and [B, 1] whether the state's last position may shift
    into the first (None: no starts known)."""
    keep = valid.clone()
    if starts is None:
        return keep, None
    keep[:, :-1] &= ~starts[:, 1:]
    return keep, ~starts[:, :1]


def shifted(
    h: Tensor, last: Tensor | None, past_keep: Tensor | None, keep: Tensor, at: Tensor | None
) -> Tensor:
    """h [B, n, C] with half its features from the position before (``last`` [B, 1, C] the
    state's, allowed where ``past_keep`` and ``at`` [B, 1])."""
    allowed = past_keep if at is None or past_keep is None else past_keep & at
    return shift_tokens(h, (1, 0), keep, past=last, past_mask=allowed)


def window_keys(attn: Attention, layer: dict, window: Tensor, dtype: torch.dtype) -> Tensor:
    """The XL window's keys/values [2, B, L, D]: stored, or with ``xl_reproject`` its inputs
    projected with the current weights once per chunk (later pieces reuse the projection)."""
    if window.dim() == 4:
        return window
    if layer.get("xl_kv") is None:
        projected = torch.stack(attn.project_kv(window.to(dtype)), dim=0)
        layer["xl_kv"] = projected.detach()
        return projected
    return layer["xl_kv"]


def layer_keys(
    model: SegmentedLM, i: int, state: State, h: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keys, values [B, M, D] and their mask [B, M] (None: all real) of layer i: [XL window ;
    the chunk so far ; the piece]."""
    parts: list[tuple[Tensor, Tensor | None]] = []
    source = model.xl_source.get(i)
    window = None if source is None else state.layers[source]["xl"]
    if window is not None:
        parts.append(
            (window_keys(model.blocks[i].attn, state.layers[i], window, h.dtype), state.shared["xl_mask"])
        )
    if state.layers[i]["open"] is not None:
        parts.append((state.layers[i]["open"], state.shared["open_mask"]))
    if not parts:
        return k, v, mask
    keys = torch.cat([*(kv[0].to(k.dtype) for kv, _ in parts), k], dim=1)
    values = torch.cat([*(kv[1].to(v.dtype) for kv, _ in parts), v], dim=1)
    valid, length = None, 0
    for kv, part_mask in [*parts, (k[None], mask)]:
        valid = cat_masks(valid, length, part_mask, kv.shape[-2], k)
        length += kv.shape[-2]
    if valid is None or (not torch.compiler.is_compiling() and bool(valid.all())):
        return keys, values, None
    return keys, values, valid


def retrieved(attn: Attention, memory, q: Tensor, after_start: Tensor | None) -> Retrieved | None:
    """The pairs a memorizing layer retrieves for queries q [B, H, n, D] (ids into the
    memory's tables, scores, found [B, H, n, K]), nothing for a query after a document start;
    None when there is no memory to search."""
    if memory is None or not attn.num_retrieved_memories:
        return None
    compiling = torch.compiler.is_compiling()
    if getattr(memory, "in_graph", False):  # a compiled call's own memory: its size is static
        if not memory.keys.shape[1]:
            return None
    elif not compiling and not bool(memory.db_offsets.any()):  # a graph searches it anyway
        return None
    ids, scores, found, keys, values = knn_ops.retrieve(memory, q, attn.num_retrieved_memories)
    if after_start is not None:
        found = found & ~after_start[:, None, :, None]
    # the backward pass reads the memory's live tables: lease the rows (a graph has copies)
    lease = memory.lease(ids) if q.requires_grad and not compiling else None
    return Retrieved(ids, scores, found, keys, values, lease)


def run_piece(model: SegmentedLM, tokens: Tensor, piece: Piece, state: State) -> Tensor:
    """Run tokens [B, n] (the next part of the open chunk); return logits [B, n, V]."""
    c, shared = model.config, state.shared
    batch, n = tokens.shape
    starts = document_starts(model, tokens, shared["doc_pending"])
    after_start = None if starts is None else (starts.cumsum(dim=1) > 0) | shared["doc_started"][:, None]
    valid = piece.mask if piece.mask is not None else tokens.new_ones(batch, n, dtype=torch.bool)
    keep, past_keep = shift_masks(valid, starts) if c.shift_tokens else (None, None)
    knn = shared["knn"] or []
    biases: dict[tuple[bool, int], Tensor] = {}
    kvs, inputs, lasts = [], {}, []
    x = model.embed(tokens)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        h = block.attn_norm(x)
        if c.shift_tokens:
            lasts.append(h[:, -1:].detach())
            h = shifted(h, state.layers[i].get("shift"), shared["shift_keep"], keep, past_keep)
        if c.xl_reproject and i in model.xl_source:
            inputs[i] = h.detach()
        q, k, v = attn.project(h)
        keys, values, key_valid = layer_keys(model, i, state, h, k, v, piece.mask)
        m = keys.shape[1]
        # shared by the layers of a kind with as many keys: built once per piece. A compiled
        # step keys them by XL source (same source, same keys), as hashing the symbolic key
        # count would fix it to one value and recompile at every step
        kind = (attn.knn, model.xl_source.get(i) if torch.compiler.is_compiling() else m)
        if kind not in biases:
            table = model.knn_rel_pos if attn.knn else model.rel_pos
            per_distance = relative_bias_values(table, n, m, causal=True)
            biases[kind] = ToeplitzBias(per_distance, n, m, causal=True)
        if attn.knn:
            j = model.knn_source[i]
            found = retrieved(attn, knn[j] if j < len(knn) else None, q, after_start)
            out = attn.attend(q, keys, values, key_valid, biases[kind], found)
        else:
            out = attn.attend(q, keys, values, key_valid, biases[kind])
        x = x + out
        x = x + block.ff(block.ff_norm(x))
        kvs.append(torch.stack([k, v], dim=0).detach())
    record_piece(model, state, piece, tokens, starts, kvs, inputs)
    if c.shift_tokens:
        record_shift(model, state, tokens, keep, lasts)
    return model.head(model.norm(x))


def record_piece(
    model: SegmentedLM,
    state: State,
    piece: Piece,
    tokens: Tensor,
    starts: Tensor | None,
    kvs: list[Tensor],
    inputs: dict[int, Tensor],
) -> None:
    """Add the piece to the open chunk: keys/values [2, B, n, D] per layer, the XL inputs,
    the key mask and where documents start."""
    shared = state.shared
    for layer, kv in zip(state.layers, kvs, strict=True):
        layer["open"] = kv if layer["open"] is None else torch.cat([layer["open"], kv], dim=-2)
    for i, h in inputs.items():
        held = state.layers[i]["open_inputs"]
        state.layers[i]["open_inputs"] = h if held is None else torch.cat([held, h], dim=1)
    shared["open_mask"] = cat_masks(shared["open_mask"], piece.offset, piece.mask, piece.width, kvs[0])
    if starts is not None:
        positions = torch.arange(piece.offset, piece.offset + piece.width, device=tokens.device)
        latest = torch.where(starts, positions, -1).amax(dim=1)
        shared["doc_last_start"] = torch.maximum(shared["doc_last_start"], latest)
        shared["doc_started"] = shared["doc_started"] | starts.any(dim=1)
        eos = model.config.clear_memories_on_eos_token_id
        if eos is not None:
            shared["doc_pending"] = tokens[:, -1] == eos


def record_shift(model: SegmentedLM, state: State, tokens: Tensor, keep: Tensor, lasts: list[Tensor]) -> None:
    """Token shift: each layer's last input, and whether it may shift into the next position
    (not when the piece ended with an eos: the next position starts a document)."""
    for layer, last in zip(state.layers, lasts, strict=True):
        layer["shift"] = last
    keep = keep[:, -1:]
    eos = model.config.clear_memories_on_eos_token_id
    state.shared["shift_keep"] = keep if eos is None else keep & (tokens[:, -1:] != eos)


def document_cut(model: SegmentedLM, state: State) -> tuple[Tensor, Tensor] | None:
    """Rows where a document started in the chunk [B] and, per row, the chunk position from
    which entries are kept [B] (the latest start); None without document start tokens."""
    c, shared = model.config, state.shared
    if c.clear_memories_on_sos_token_id is None and c.clear_memories_on_eos_token_id is None:
        return None
    pending = shared["doc_pending"]
    started = shared["doc_started"] | pending
    last_start = torch.where(pending, state.shared["open_length"], shared["doc_last_start"])
    return started, torch.where(started, last_start, LONG_MIN)


def commit_chunk(model: SegmentedLM, state: State, *, add_knn_memory: bool = True) -> None:
    """Move the open chunk into the XL windows and the kNN memories; empty it."""
    shared, size = state.shared, state.shared["open_length"]
    knn = shared["knn"]
    if knn is not None:
        open_mask, xl_mask = shared["open_mask"], shared["xl_mask"]
        cut = document_cut(model, state)
        if cut is not None:
            started, first = cut
            kept = torch.arange(size, device=first.device)[None, :] >= first[:, None]
            open_mask = kept if open_mask is None else open_mask & kept
            window = layer_entry(state, "xl")
            xl_mask = hide_rows(xl_mask, 0 if window is None else window.shape[-2], started)
            for memory in knn:
                knn_ops.clear(memory, started)
        windows = {}
        for i, layer in enumerate(state.layers):
            entries = layer["open"] if layer["open_inputs"] is None else layer["open_inputs"]
            leaving = XLMemory([entries], open_mask)
            if i in model.xl_source:
                window = state.layers[model.xl_source[i]]["xl"]
                held = XLMemory(
                    [entries[..., :0, :] if window is None else window.to(entries.dtype)], xl_mask
                )
                windows[i], leaving = model.xl_memory.push(held, [entries], open_mask)
            if add_knn_memory and i in model.knn_source:
                store(model.blocks[i].attn, knn[model.knn_source[i]], leaving)
        for i, window in windows.items():
            state.layers[i]["xl"] = window.entries[0]
            shared["xl_mask"] = window.mask
    for layer in state.layers:
        layer.update(open=None, open_inputs=None, xl_kv=None)
    empty_chunk(state)


def store(attn: Attention, memory, leaving: XLMemory) -> None:
    """Add entries that left the XL window (or the whole chunk) to a kNN memory: keys/values
    [2, B, n, D], or XL inputs [B, n, C] projected with the current weights."""
    entries, mask = leaving.entries[0], leaving.mask
    if not entries.shape[-2]:
        return
    if entries.dim() == 3:
        with torch.no_grad():
            pairs = torch.stack(attn.project_kv(entries), dim=-2)
    else:
        pairs = entries.permute(1, 2, 0, 3)
    knn_ops.add(memory, pairs, mask)


def empty_chunk(state: State) -> None:
    """The shared entries of an empty chunk."""
    batch, like = state.batch_size, state.shared["doc_started"]
    no = torch.zeros(batch, dtype=torch.bool, device=like.device)
    state.shared.update(open_mask=None, doc_started=no, doc_last_start=no.long() - 1, doc_pending=no)
