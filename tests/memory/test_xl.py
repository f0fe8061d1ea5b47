"""memory/xl: FIFO memories with optional compression; push returns what leaves the window;
entries may be keys/values or layer inputs; masks follow positions into the memory, out of
it and into compressed slots; the per-layer stream equals pushing whole blocks; the
compressed memory equals the block-recurrent reference's MemoryManager."""

from __future__ import annotations

import pytest
import torch

from longrange.memory.xl import XLMemory, XLMemoryManager, XLStream
from longrange.testing import assert_close, import_reference

D = 4


def kv(batch, n, *, seed, layers=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, batch, n, D, generator=gen) for _ in range(layers)]


def test_fifo_keeps_the_last_positions():
    manager = XLMemoryManager(D, layers=2, mem_length=6)
    memory = XLMemory.empty(2, 3, D, torch.zeros(1))
    blocks = [kv(3, n, seed=n) for n in (4, 5, 3)]
    left = []
    for block in blocks:
        memory, leaving = manager.push(memory, block)
        left.append(leaving.entries[1])
        assert leaving.mask is None
    stream = torch.cat([b[1] for b in blocks], dim=-2)
    assert len(memory) == 6 and memory.mask is None and memory.compressed == 0
    assert torch.equal(memory.entries[1], stream[..., -6:, :])
    # what left the window, in order: everything but the last 6 positions
    assert [t.shape[-2] for t in left] == [0, 3, 3]
    assert torch.equal(torch.cat(left, dim=-2), stream[..., :-6, :])


def test_layer_inputs_are_entries_too():
    # [B, M, C] entries (memorizing's xl_reproject keeps layer inputs) move like keys/values.
    manager = XLMemoryManager(D, layers=1, mem_length=4)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    memory, _ = manager.push(XLMemory.empty(1, 2, 5, torch.zeros(1), pairs=False), [first], mask)
    memory, leaving = manager.push(memory, [second])
    assert torch.equal(memory.entries[0], torch.cat([first, second], dim=1)[:, -4:])
    assert torch.equal(leaving.entries[0], first[:, :2])
    assert torch.equal(leaving.mask, mask[:, :2]) and torch.equal(memory.mask[:, 0], mask[:, 2])
    hidden = memory.reset_rows(torch.tensor([False, True]))
    assert torch.equal(hidden.mask[0], memory.mask[0]) and not hidden.mask[1].any()


def test_masks_follow_positions_and_rows_reset():
    manager = XLMemoryManager(D, layers=2, mem_length=5)
    memory = XLMemory.empty(2, 2, D, torch.zeros(1))
    memory, _ = manager.push(memory, kv(2, 3, seed=0))  # no mask: all real
    mask = torch.tensor([[True, False, True], [False, False, True]])
    memory, leaving = manager.push(memory, kv(2, 3, seed=1), mask)
    expected = torch.tensor([[True, True, True, False, True], [True, True, False, False, True]])
    assert torch.equal(memory.mask, expected)
    assert torch.equal(leaving.mask, torch.ones(2, 1, dtype=torch.bool))
    reset = memory.reset_rows(torch.tensor([False, True]))
    assert torch.equal(reset.mask[0], expected[0]) and not reset.mask[1].any()


def test_compression_fills_a_second_fifo():
    torch.manual_seed(0)
    manager = XLMemoryManager(D, layers=2, mem_length=8, compress_factor=2, compressed_length=4)
    memory = XLMemory.empty(2, 1, D, torch.zeros(1))
    blocks = [kv(1, 8, seed=i) for i in range(4)]
    for block in blocks:
        memory, leaving = manager.push(memory, block)
    # raw: the last block; compressed: the last 4 slots = blocks 1 and 2, 2 positions per slot
    assert memory.compressed == 4 and len(memory) == 12
    assert torch.equal(memory.entries[0][..., 4:, :], blocks[3][0])
    assert torch.equal(leaving.entries[0], blocks[2][0])  # the raw positions that were squeezed
    expected = manager._compress(0, torch.cat([blocks[1][0], blocks[2][0]], dim=-2), None)[..., -4:, :]
    assert_close(memory.entries[0][..., :4, :], expected)


def test_compressed_slots_ignore_masked_positions():
    torch.manual_seed(0)
    manager = XLMemoryManager(D, layers=1, mem_length=4, compress_factor=2, compressed_length=4)
    mask = torch.tensor([[True, False, False, False]])
    outs = []
    for noise in (0.0, 5.0):
        block = kv(1, 4, seed=0, layers=1)
        block[0][..., 1:, :] += noise  # only masked positions change
        memory, _ = manager.push(XLMemory.empty(1, 1, D, torch.zeros(1)), block, mask)
        memory, _ = manager.push(memory, kv(1, 4, seed=1, layers=1))
        outs.append(memory)
    assert torch.equal(outs[0].mask[0, :2], torch.tensor([True, False]))  # slot of 2 masked positions
    assert torch.equal(outs[0].entries[0][..., :1, :], outs[1].entries[0][..., :1, :])


def test_stream_equals_push():
    manager = XLMemoryManager(D, layers=2, mem_length=6, compress_factor=3, compressed_length=2)
    memory = XLMemory.empty(2, 2, D, torch.zeros(1))
    pending = XLMemory.empty(2, 2, D, torch.zeros(1))
    stream = XLStream(manager, 1, memory.layer(1), pending.layer(1))
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) < 0.7
    for i in range(4):
        block = kv(2, 6, seed=i)
        first, second = block[1][..., :2, :], block[1][..., 2:, :]
        keys, key_mask, _ = stream.take(first, mask[:, :2], finish=False)
        assert torch.equal(keys[..., -2:, :], first)
        keys, key_mask, full = stream.take(second, mask[:, 2:], finish=True)
        assert torch.equal(full.entries[0], block[1])
        assert torch.equal(key_mask[:, -6:], mask)
        assert torch.equal(keys[..., : len(memory), :], memory.entries[1])
        memory, _ = manager.push(memory, block, mask)
        assert torch.equal(stream.memory.entries[0], memory.entries[1])
        assert torch.equal(stream.memory.mask, memory.mask)


def test_matches_reference_memory_manager():
    ref_module = import_reference("block_recurrent_transformer_pytorch.block_recurrent_transformer_pytorch")
    torch.manual_seed(0)
    ref = ref_module.MemoryManager(dim=D, layers=2, mem_lengths=(8, 4), compress_factors=(1, 2))
    ours = XLMemoryManager(D, layers=2, mem_length=8, compress_factor=2, compressed_length=4)
    for i in range(2):
        ours.compress[i].load_state_dict(ref.layers[i][1][1].state_dict())
    ref_mem, memory = [], XLMemory.empty(2, 2, D, torch.zeros(1))
    for i, n in enumerate((8, 8, 5, 8, 8)):
        block = kv(2, n, seed=i)
        ref_mem = ref(ref_mem, block)
        memory, _ = ours.push(memory, block)
        for a, b in zip(memory.entries, ref_mem, strict=True):
            assert_close(a, b, name=f"block {i}")


def test_bad_arguments():
    with pytest.raises(ValueError, match="mem_length"):
        XLMemoryManager(D, layers=1, mem_length=0)
    with pytest.raises(ValueError, match="compressed_length"):
        XLMemoryManager(D, layers=1, mem_length=4, compress_factor=2)
    with pytest.raises(ValueError, match="same number of positions"):
        XLMemory([torch.zeros(2, 1, 3, D), torch.zeros(2, 1, 4, D)])
