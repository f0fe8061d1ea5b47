"""The segment flow: how block_recurrent and memorizing carry state across segments.

Both families read a sequence in segments of fixed length (block_recurrent: blocks of
``block_width``; memorizing: chunks of ``max_seq_len``) and keep, in one
:class:`~longrange.models.state.State`, what the next segment needs (docs/ARCHITECTURE.md,
"Segment flow"). :class:`SegmentedLM` writes their protocol once:

- a call's positions are cut into :class:`Piece` s that stay inside one segment, the first
  continuing the segment the state left open (:func:`cut`);
- the family computes the pieces (:meth:`SegmentedLM.run`): by default one piece after the
  other, each committed when it fills its segment; block_recurrent instead runs all pieces
  of a call layer by layer (batched) and commits each layer's segment inside that walk;
- committing closes the open segment (block_recurrent: write the recurrent states and push
  the block into the XL memory; memorizing: move the chunk into the XL window and the kNN
  memories). At the end of a ``forward_lm`` call memorizing commits a partial chunk too
  (``flush_at_call_end``), block_recurrent leaves its partial block open for the next call;
  :meth:`SegmentedLM.flush` commits it on request;
- ``forward_lm(state=)``, ``init_state``, ``decode`` (so ``prefill`` / ``step``),
  ``reset_state_rows`` (a document starts: rows forget everything, open segment included),
  ``detach_state`` and ``load_state`` are the same for both.

Entries the flow knows: ``shared["open_length"]`` (positions in the open segment), the key
masks ``shared["xl_mask"]`` and ``shared["open_mask"]`` (None = all real) of the per-layer
XL windows ``layers[i]["xl"]`` and open segments ``layers[i]["open"]`` (entries with
positions on dim -2), and the per-layer entries a family derives from the others
(``derived_entries``: dropped on detach and on a reset, rebuilt when needed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longrange.memory.xl import hide_rows
from longrange.models.base import LMOutput, LongRangeLM
from longrange.models.state import State


@dataclass(frozen=True)
class Piece:
    """Positions [start, stop) of a call, inside one segment after the ``offset`` positions
    the segment already holds; ``finish``: they complete it; ``mask`` [B, n] or None."""

    index: int
    start: int
    stop: int
    offset: int
    finish: bool
    mask: Tensor | None

    @property
    def width(self) -> int:
        return self.stop - self.start


def cut(n: int, filled: int, size: int, mask: Tensor | None = None) -> list[Piece]:
    """Cut n positions into pieces that each stay inside one segment of ``size``, the first
    continuing a segment that already holds ``filled`` positions."""
    pieces, start = [], 0
    while start < n:
        take = min(size - filled, n - start)
        piece_mask = None if mask is None else mask[:, start : start + take]
        pieces.append(Piece(len(pieces), start, start + take, filled, filled + take == size, piece_mask))
        start, filled = start + take, 0
    return pieces


def layer_entry(state: State, name: str) -> Tensor | None:
    """The first layer's ``name`` entry that is a tensor (the layers' windows, and their open
    segments, hold the same positions); None when no layer has one."""
    return next((layer[name] for layer in state.layers if isinstance(layer.get(name), Tensor)), None)


class SegmentedLM(LongRangeLM):
    """Base of the families that carry state across segments (see the module docstring).

    A family provides :meth:`segment_length`, :meth:`fresh_state`, :meth:`commit`,
    :meth:`forget_rows` and either :meth:`run_piece` or its own :meth:`run`.
    """

    carries_state = True
    # Commit a partial segment at the end of every forward_lm call that keeps its state.
    flush_at_call_end: ClassVar[bool] = False
    # Per-layer entries derived from the others (dropped by detach_state and reset_state_rows).
    derived_entries: ClassVar[tuple[str, ...]] = ()

    # --- what a family provides -------------------------------------------------------------
    def segment_length(self) -> int:
        raise NotImplementedError

    def fresh_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """A state with the family's entries for a new sequence (the flow's included)."""
        raise NotImplementedError

    def call_state(self, batch_size: int, length: int, device: torch.device) -> tuple[State, bool]:
        """The state of a forward_lm call given none, and whether the call returns it (False:
        it is closed after the call)."""
        return self.fresh_state(batch_size, device), True

    def run_piece(self, tokens: Tensor, piece: Piece, state: State) -> Tensor:
        """Logits [B, n, V] of one piece's tokens; add the piece to the open segment."""
        raise NotImplementedError

    def commit(self, state: State, **options: Any) -> None:
        """Close the open segment (it holds ``shared["open_length"]`` > 0 positions)."""
        raise NotImplementedError

    def forget_rows(self, state: State, rows: Tensor) -> None:
        """The family's part of a row reset (the flow hides the rows in the XL and open masks)."""

    def carry(self, state: State) -> None:
        """What forward_lm keeps of a state it is given (everything by default)."""

    # --- the flow -----------------------------------------------------------------------------
    def run(
        self, tokens: Tensor, mask: Tensor | None, pieces: list[Piece], state: State, **options
    ) -> Tensor:
        """Logits [B, N, V] of the call's pieces, one after the other, each committed when it
        fills its segment."""
        logits = []
        for piece in pieces:
            logits.append(self.run_piece(tokens[:, piece.start : piece.stop], piece, state))
            state.shared["open_length"] = piece.offset + piece.width
            if piece.finish:
                self.commit(state, **options)
                state.shared["open_length"] = 0
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)

    def advance(self, tokens: Tensor, mask: Tensor | None, state: State, **options: Any) -> Tensor:
        """Run tokens [B, N] after the state's open segment; return logits [B, N, V]."""
        pieces = cut(tokens.shape[1], state.shared["open_length"], self.segment_length(), mask)
        logits = self.run(tokens, mask, pieces, state, **options)
        last = pieces[-1]
        state.shared["open_length"] = 0 if last.finish else last.offset + last.width
        return logits

    def flush(self, state: State, **options: Any) -> State:
        """Commit the open segment now, a partial one too; return the state."""
        if state.shared["open_length"]:
            self.commit(state, **options)
            state.shared["open_length"] = 0
        return state

    def forward_lm(
        self, tokens: Tensor, *, mask: Tensor | None = None, state: State | None = None
    ) -> LMOutput:
        """tokens [B, N] (any N: segments continue across calls), mask [B, N] (True = real).
        A given state is continued and updated in place."""
        self.check_tokens(tokens, mask, allow_longer=True)
        batch, n = tokens.shape
        given = state is not None
        if given:
            self.check_state(state, batch)
            self.carry(state)
            keep = True
        else:
            state, keep = self.call_state(batch, n, tokens.device)
        try:
            logits = self.advance(tokens, mask, state)
            if given and self.flush_at_call_end:
                self.flush(state)
        finally:
            if not keep:
                state.close()
        state.position += n
        return LMOutput(logits, None, state if keep else None)

    # --- the protocol -------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None, **conditioning) -> State:
        self.check_conditioning(conditioning)
        return self.fresh_state(batch_size, device)

    def decode(self, tokens: Tensor, state: State) -> Tensor:
        return self.advance(tokens, None, state)

    def context_limit(self) -> int | None:
        return None

    def check_state(self, state: Any, batch: int) -> None:
        super().check_state(state, batch)
        if "open_length" not in state.shared or len(state.layers) != self.config.depth:
            raise ValueError(f"this state was not made by {type(self).__name__}.init_state")

    def reset_state_rows(self, state: State, rows: Tensor) -> State:
        """Forget everything of the rows where ``rows`` [B] is True (a document starts)."""
        rows = rows.to(torch.bool)
        if rows.shape != (state.batch_size,):
            raise ValueError(f"rows must have shape ({state.batch_size},), got {tuple(rows.shape)}")
        if not bool(rows.any()):
            return state
        for mask, name in (("xl_mask", "xl"), ("open_mask", "open")):
            entry = layer_entry(state, name)
            if entry is not None:
                state.shared[mask] = hide_rows(state.shared[mask], entry.shape[-2], rows.to(entry.device))
        self.forget_rows(state, rows)
        self._drop_derived(state)
        return state

    def detach_state(self, state: State) -> State:
        """The state cut from the autograd graph; derived entries are dropped, so that the next
        call rebuilds them with gradients."""
        state = state.detach()
        self._drop_derived(state)
        return state

    def load_state(self, directory: str | os.PathLike, *, batch_size: int, device: Any = "cpu") -> State:
        state = super().load_state(directory, batch_size=batch_size, device=device)
        return state.checked(lambda state: self.check_state(state, batch_size))

    def _drop_derived(self, state: State) -> None:
        for layer in state.layers:
            for name in self.derived_entries:
                layer.pop(name, None)
