"""Transformer-XL memories: every layer's entries of the most recent positions.

A layer attends to [memory ; its own segment], so the memory gives each segment the previous
one's context (Dai et al. 2019). The manager keeps ``mem_length`` raw positions per layer,
first in, first out, and :meth:`XLMemoryManager.push` returns the positions that leave as
well as those kept (the Memorizing Transformer moves them into its kNN memory). With
compression (Rae et al. 2020, the block-recurrent reference's ``use_compressed_mem``) the
positions that fall out are also squeezed ``compress_factor`` to one by a strided
convolution (keys and values separately) and kept in a second FIFO of ``compressed_length``
slots in front of the raw ones.

Entries are any tensors with positions on dim -2 and the batch on dim -3: keys/values
[2, B, M, D] (block_recurrent, memorizing) or layer inputs [B, M, C] (memorizing's
``xl_reproject``); compression needs keys/values. Memories carry one key mask [B, M] shared
by the layers (None = every position real), so that padding and the rows of a batch reset
for a new document stay invisible after they move into the memory. Masked positions are
zeroed before compression, so a compressed slot never holds anything of a masked position.

Dimensions: B batch, M memory positions (compressed slots first), N new positions,
D head width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def cat_masks(a: Tensor | None, len_a: int, b: Tensor | None, len_b: int, like: Tensor) -> Tensor | None:
    """Concatenate two optional [B, *] masks (None = all True) along positions; ``like`` is an
    entry tensor (batch on dim -3) giving the batch size and device."""
    if a is None and b is None:
        return None
    batch = like.shape[-3]
    if a is None:
        a = torch.ones(batch, len_a, dtype=torch.bool, device=like.device)
    if b is None:
        b = torch.ones(batch, len_b, dtype=torch.bool, device=like.device)
    return torch.cat((a, b), dim=1)


def hide_rows(mask: Tensor | None, length: int, rows: Tensor) -> Tensor | None:
    """The mask [B, length] (None = all True) with every position of ``rows`` [B] hidden; an
    empty memory keeps its mask."""
    if not length:
        return mask
    if mask is None:
        mask = torch.ones(rows.shape[0], length, dtype=torch.bool, device=rows.device)
    return mask & ~rows.to(mask.device)[:, None]


@dataclass
class XLMemory:
    """Per-layer entries of the last M positions, oldest first (see the module docstring).

    ``mask`` [B, M] (None = every position may be attended) is shared by the layers, which
    always hold the same positions; the first ``compressed`` of the M are compressed slots.
    """

    entries: list[Tensor]
    mask: Tensor | None = None
    compressed: int = 0
    _length: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        lengths = [t.shape[-2] for t in self.entries]  # (a list: hashing would fix symbolic sizes)
        if any(length != lengths[0] for length in lengths[1:]):
            raise ValueError(
                f"every layer's memory must hold the same number of positions, got {sorted(set(lengths))}"
            )
        self._length = lengths[0] if lengths else 0
        if self.mask is not None and tuple(self.mask.shape[-1:]) != (self._length,):
            raise ValueError(f"memory mask covers {self.mask.shape[-1]} positions, memory {self._length}")

    @classmethod
    def empty(cls, layers: int, batch: int, width: int, like: Tensor, *, pairs: bool = True) -> XLMemory:
        """No positions: entries [2, B, 0, width] (``pairs``) or [B, 0, width]."""
        shape = (2, batch, 0, width) if pairs else (batch, 0, width)
        return cls([like.new_zeros(shape)] * layers)

    def __len__(self) -> int:
        return self._length

    def layer(self, i: int) -> XLMemory:
        """Layer i's entries alone (same mask)."""
        return XLMemory([self.entries[i]], self.mask, self.compressed)

    def detach(self) -> XLMemory:
        return XLMemory([t.detach() for t in self.entries], self.mask, self.compressed)

    def reset_rows(self, rows: Tensor) -> XLMemory:
        """Hide every position of the batch rows where ``rows`` [B] is True."""
        return XLMemory(self.entries, hide_rows(self.mask, len(self), rows), self.compressed)

    def append(self, new: list[Tensor], new_mask: Tensor | None) -> XLMemory:
        """Plain concatenation (no eviction): the buffer of a segment still being filled."""
        if not len(self):
            return XLMemory(list(new), new_mask, 0)
        entries = [torch.cat((old, add), dim=-2) for old, add in zip(self.entries, new, strict=True)]
        mask = cat_masks(self.mask, len(self), new_mask, new[0].shape[-2], new[0])
        return XLMemory(entries, mask, self.compressed)


class XLMemoryManager(nn.Module):
    """Pushes new entries into per-layer FIFO memories, optionally compressing what falls
    out (see the module docstring).

    Args:
        dim_head: key/value width D.
        layers: number of layers with a memory.
        mem_length: raw positions kept per layer.
        compress_factor: positions per compressed slot; 1 (or less) turns compression off.
        compressed_length: compressed slots kept per layer.
    """

    def __init__(
        self,
        dim_head: int,
        *,
        layers: int,
        mem_length: int,
        compress_factor: int = 1,
        compressed_length: int = 0,
    ) -> None:
        super().__init__()
        if mem_length <= 0:
            raise ValueError(f"mem_length must be positive, got {mem_length}")
        if layers <= 0:
            raise ValueError(f"layers must be positive, got {layers}")
        self.mem_length = mem_length
        self.compress_factor = max(1, compress_factor)
        self.compressed_length = compressed_length if self.compress_factor > 1 else 0
        if self.compress_factor > 1 and compressed_length <= 0:
            raise ValueError(f"compressed_length must be positive when compressing, got {compressed_length}")
        self.compress = nn.ModuleList()
        if self.compress_factor > 1:
            f = self.compress_factor
            for _ in range(layers):
                self.compress.append(nn.Conv1d(2 * dim_head, 2 * dim_head, f, stride=f, groups=2))

    def push(
        self,
        memory: XLMemory,
        new: list[Tensor],
        new_mask: Tensor | None = None,
        *,
        layers: list[int] | None = None,
    ) -> tuple[XLMemory, XLMemory]:
        """memory + new entries (per layer, N positions; mask [B, N]) -> (the memory after,
        the raw positions that left it, oldest first, with their mask).

        ``layers`` names the layers the memory's entries belong to (all, in order, by default).
        """
        c, w, f = memory.compressed, self.mem_length, self.compress_factor
        layers = list(range(len(memory.entries))) if layers is None else layers
        n = new[0].shape[-2]
        joined_mask = cat_masks(memory.mask, len(memory), new_mask, n, new[0])
        raw_mask = None if joined_mask is None else joined_mask[:, c:]
        raw_len = len(memory) - c + n
        spill = max(0, raw_len - w)
        spill_used = (spill // f) * f  # the oldest remainder is dropped, as in the reference
        kept_mask = None if raw_mask is None else raw_mask[:, spill:]
        left_mask = None if raw_mask is None else raw_mask[:, :spill]
        out, left, comp_mask = [], [], None
        for first, (layer, old, add) in enumerate(zip(layers, memory.entries, new, strict=True)):
            raw = torch.cat((old[..., c:, :], add), dim=-2)
            keep = raw[..., spill:, :]
            left.append(raw[..., :spill, :])
            if f == 1:
                out.append(keep)
                continue
            comp = old[..., :c, :]
            slots_mask = None
            if spill_used:
                gone = raw[..., spill - spill_used : spill, :]
                gone_mask = None if raw_mask is None else raw_mask[:, spill - spill_used : spill]
                slots = self._compress(layer, gone, gone_mask)
                comp = torch.cat((comp, slots), dim=-2)
                if gone_mask is not None:
                    slots_mask = gone_mask.view(gone_mask.shape[0], -1, f).any(dim=-1)
            if first == 0:
                old_comp_mask = None if joined_mask is None else joined_mask[:, :c]
                comp_mask = cat_masks(old_comp_mask, c, slots_mask, comp.shape[-2] - c, comp)
            comp = comp[..., -self.compressed_length :, :]
            out.append(torch.cat((comp, keep), dim=-2))
        leaving = XLMemory(left, left_mask)
        if f == 1:
            return XLMemory(out, kept_mask, 0), leaving
        new_c = out[0].shape[-2] - keep.shape[-2]
        if comp_mask is not None:
            comp_mask = comp_mask[:, comp_mask.shape[1] - new_c :]
        mask = cat_masks(comp_mask, new_c, kept_mask, keep.shape[-2], out[0])
        return XLMemory(out, mask, new_c), leaving

    def _compress(self, layer: int, kv: Tensor, mask: Tensor | None) -> Tensor:
        """[2, B, L, D] with L a multiple of the factor -> [2, B, L / factor, D]."""
        if mask is not None:
            kv = kv * mask[None, :, :, None].to(kv.dtype)
        two, batch, length, d = kv.shape
        x = kv.permute(1, 0, 3, 2).reshape(batch, two * d, length)  # channels: keys, then values
        y = self.compress[layer](x)
        return y.view(batch, two, d, -1).permute(1, 0, 3, 2)


class XLStream:
    """One layer's memory as a call moves through its pieces (runs of positions inside one
    segment): for each piece :meth:`take` returns the entries it attends to, [memory ; the
    segment so far ; the piece], and moves on (pushing the segment into the memory when the
    piece completes it)."""

    def __init__(self, manager: XLMemoryManager, layer: int, memory: XLMemory, pending: XLMemory) -> None:
        self.manager, self.layer = manager, layer
        self.memory, self.pending = memory, pending

    def take(self, kv: Tensor, mask: Tensor | None, finish: bool) -> tuple[Tensor, Tensor | None, XLMemory]:
        """kv [2, B, n, D] of the piece, mask [B, n] -> (keys/values [2, B, K, D], key mask
        [B, K] or None, the segment so far including the piece)."""
        memory, pending = self.memory, self.pending
        parts = [t.entries[0] for t in (memory, pending) if len(t)]
        keys = torch.cat((*parts, kv), dim=-2) if parts else kv
        key_mask = None
        if memory.mask is not None or pending.mask is not None or mask is not None:
            key_mask = cat_masks(memory.mask, len(memory), pending.mask, len(pending), kv)
            key_mask = cat_masks(key_mask, len(memory) + len(pending), mask, kv.shape[-2], kv)
        block = pending.append([kv], mask)
        if finish:
            self.memory, _ = self.manager.push(memory, block.entries, block.mask, layers=[self.layer])
            self.pending = XLMemory([kv[..., :0, :]])
        else:
            self.pending = block
        return keys, key_mask, block
