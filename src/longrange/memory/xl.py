"""Transformer-XL memories: every layer's keys/values of the most recent positions.

A layer attends to [memory ; its own block], so the memory gives each block the previous
block's context (Dai et al. 2019). The manager keeps ``mem_length`` raw positions per layer,
first in, first out; with compression (Rae et al. 2020, the block-recurrent reference's
``use_compressed_mem``) the positions that fall out are not dropped but squeezed
``compress_factor`` to one by a strided convolution (keys and values separately) and kept
in a second FIFO of ``compressed_length`` slots in front of the raw ones.

Memories carry a key mask, so that padding (and the rows of a batch reset for a new
document) stays invisible after it moves into the memory. Masked positions are zeroed
before compression, so a compressed slot never holds anything of a masked position.

Dimensions: B batch, M memory positions (compressed slots first), N new positions,
D head width; kv tensors are [2, B, M, D] (keys, then values), one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def _cat_masks(a: Tensor | None, len_a: int, b: Tensor | None, len_b: int, like: Tensor) -> Tensor | None:
    """Concatenate two optional [B, *] masks (None = all True) along positions."""
    if a is None and b is None:
        return None
    batch = like.shape[1]
    if a is None:
        a = torch.ones(batch, len_a, dtype=torch.bool, device=like.device)
    if b is None:
        b = torch.ones(batch, len_b, dtype=torch.bool, device=like.device)
    return torch.cat((a, b), dim=1)


@dataclass
class XLMemory:
    """Per-layer keys/values [2, B, M, D] of the last M positions, oldest first.

    ``mask`` [B, M] (None = every position may be attended) is shared by the layers, which
    always hold the same positions; the first ``compressed`` of the M are compressed slots.
    """

    kv: list[Tensor]
    mask: Tensor | None = None
    compressed: int = 0
    _length: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        lengths = {t.shape[-2] for t in self.kv}
        if len(lengths) > 1:
            raise ValueError(f"every layer's memory must hold the same number of positions, got {lengths}")
        self._length = lengths.pop() if lengths else 0
        if self.mask is not None and tuple(self.mask.shape[-1:]) != (self._length,):
            raise ValueError(f"memory mask covers {self.mask.shape[-1]} positions, memory {self._length}")

    @classmethod
    def empty(cls, layers: int, batch: int, dim_head: int, like: Tensor) -> XLMemory:
        kv = like.new_zeros(2, batch, 0, dim_head)
        return cls([kv] * layers)

    def __len__(self) -> int:
        return self._length

    def detach(self) -> XLMemory:
        return XLMemory([t.detach() for t in self.kv], self.mask, self.compressed)

    def reset_rows(self, rows: Tensor) -> XLMemory:
        """Hide every position of the batch rows where ``rows`` [B] is True."""
        if not len(self):
            return self
        mask = self.full_mask() & ~rows[:, None]
        return XLMemory(self.kv, mask, self.compressed)

    def full_mask(self) -> Tensor:
        if self.mask is not None:
            return self.mask
        like = self.kv[0]
        return torch.ones(like.shape[1], len(self), dtype=torch.bool, device=like.device)

    def append(self, new_kv: list[Tensor], new_mask: Tensor | None) -> XLMemory:
        """Plain concatenation (no eviction): the buffer of a block still being filled."""
        if not len(self):
            return XLMemory(list(new_kv), new_mask, 0)
        kv = [torch.cat((old, new), dim=-2) for old, new in zip(self.kv, new_kv, strict=True)]
        mask = _cat_masks(self.mask, len(self), new_mask, new_kv[0].shape[-2], new_kv[0])
        return XLMemory(kv, mask, self.compressed)


class XLMemoryManager(nn.Module):
    """Pushes new keys/values into per-layer FIFO memories, optionally compressing what
    falls out (see the module docstring).

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
        new_kv: list[Tensor],
        new_mask: Tensor | None = None,
        *,
        layers: list[int] | None = None,
    ) -> XLMemory:
        """memory + new keys/values (per layer [2, B, N, D], mask [B, N]) -> the memory after.

        ``layers`` names the layers the memory's entries belong to (all, in order, by default).
        """
        c, w, f = memory.compressed, self.mem_length, self.compress_factor
        layers = list(range(len(memory.kv))) if layers is None else layers
        n = new_kv[0].shape[-2]
        joined_mask = _cat_masks(memory.mask, len(memory), new_mask, n, new_kv[0])
        raw_len = len(memory) - c + n
        spill = max(0, raw_len - w)
        if f > 1:
            spill_used = (spill // f) * f  # the oldest remainder is dropped, as in the reference
        kept_mask = None if joined_mask is None else joined_mask[:, c:][:, spill:]
        out_kv, comp_mask = [], None
        for first, (layer, old, new) in enumerate(zip(layers, memory.kv, new_kv, strict=True)):
            raw = torch.cat((old[..., c:, :], new), dim=-2)
            keep = raw[..., spill:, :]
            if f == 1:
                out_kv.append(keep)
                continue
            comp = old[..., :c, :]
            slots_mask = None
            if spill_used:
                gone = raw[..., spill - spill_used : spill, :]
                gone_mask = None if joined_mask is None else joined_mask[:, c:][:, spill - spill_used : spill]
                slots = self._compress(layer, gone, gone_mask)
                comp = torch.cat((comp, slots), dim=-2)
                if gone_mask is not None:
                    slots_mask = gone_mask.view(gone_mask.shape[0], -1, f).any(dim=-1)
            if first == 0:
                old_comp_mask = None if joined_mask is None else joined_mask[:, :c]
                comp_mask = _cat_masks(old_comp_mask, c, slots_mask, comp.shape[-2] - c, comp)
            comp = comp[..., -self.compressed_length :, :]
            out_kv.append(torch.cat((comp, keep), dim=-2))
        if f == 1:
            return XLMemory(out_kv, kept_mask, 0)
        new_c = out_kv[0].shape[-2] - keep.shape[-2]
        if comp_mask is not None:
            comp_mask = comp_mask[:, comp_mask.shape[1] - new_c :]
        mask = _cat_masks(comp_mask, new_c, kept_mask, keep.shape[-2], out_kv[0])
        return XLMemory(out_kv, mask, new_c)

    def _compress(self, layer: int, kv: Tensor, mask: Tensor | None) -> Tensor:
        """[2, B, L, D] with L a multiple of the factor -> [2, B, L / factor, D]."""
        if mask is not None:
            kv = kv * mask[None, :, :, None].to(kv.dtype)
        two, batch, length, d = kv.shape
        x = kv.permute(1, 0, 3, 2).reshape(batch, two * d, length)  # channels: keys, then values
        y = self.compress[layer](x)
        return y.view(batch, two, d, -1).permute(1, 0, 3, 2)


class XLStream:
    """One layer's memory as a call moves through its chunks: for each chunk (a run of
    positions inside one block) :meth:`take` returns the keys/values it attends to,
    [memory ; the block so far ; the chunk], and moves on (pushing the block into the memory
    when the chunk completes it)."""

    def __init__(self, manager: XLMemoryManager, layer: int, memory: XLMemory, pending: XLMemory) -> None:
        self.manager, self.layer = manager, layer
        self.memory = XLMemory([memory.kv[layer]], memory.mask, memory.compressed)
        self.pending = XLMemory([pending.kv[layer]], pending.mask)

    def take(self, kv: Tensor, mask: Tensor | None, finish: bool) -> tuple[Tensor, Tensor | None, XLMemory]:
        """kv [2, B, n, D] of the chunk, mask [B, n] -> (keys/values [2, B, K, D], key mask
        [B, K] or None, the block so far including the chunk)."""
        memory, pending = self.memory, self.pending
        parts = [t.kv[0] for t in (memory, pending) if len(t)]
        keys = torch.cat((*parts, kv), dim=-2) if parts else kv
        key_mask = None
        if memory.mask is not None or pending.mask is not None or mask is not None:
            key_mask = _cat_masks(memory.mask, len(memory), pending.mask, len(pending), kv)
            key_mask = _cat_masks(key_mask, len(memory) + len(pending), mask, kv.shape[-2], kv)
        block = pending.append([kv], mask)
        if finish:
            self.memory = self.manager.push(memory, block.kv, block.mask, layers=[self.layer])
            self.pending = XLMemory([kv[..., :0, :]])
        else:
            self.pending = block
        return keys, key_mask, block
