"""models/flow: the segment flow of block_recurrent and memorizing. Pieces stay inside one
segment; a forward call continues its state in place and ends as the family's policy says
(memorizing commits its chunk, block_recurrent leaves its block open until a flush); a state
saved mid-document (mid-segment, kNN memories and all) loads and continues bit-identically."""

from __future__ import annotations

import gc
import glob
import os
import tempfile

import pytest
import torch

from longrange.models.flow import cut
from longrange.models.registry import create_model

V = 48
OPTIONS = {
    # blocks of 8 with compressed memory and two recurrent layers (one read below its write)
    "block_recurrent": dict(
        vocab_size=V,
        dim=32,
        depth=3,
        heads=2,
        dim_head=8,
        block_width=8,
        num_state_vectors=4,
        max_seq_len=32,
        use_compressed_mem=True,
        compressed_mem_factor=2,
        recurrent_layers=(2, 3),
        read_recurrent_layers=(1, 3),
    ),
    # chunks of 8, XL windows of inputs re-projected, token shift, eos starts, a faiss index
    "memorizing": dict(
        vocab_size=V,
        dim=32,
        depth=2,
        heads=2,
        max_seq_len=8,
        max_knn_memories=64,
        num_retrieved_memories=4,
        memorizing_layers=(1, 2),
        xl_max_memories=5,
        xl_reproject=True,
        shift_tokens=True,
        clear_memories_on_eos_token_id=3,
        knn_backend="faiss",
        knn_combine="gate",
    ),
}


def model_for(family: str):
    torch.manual_seed(0)
    return create_model(family, **OPTIONS[family]).eval()


def tokens(batch, n, seed):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _no_memory_files_left(tmp_path, monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield
    gc.collect()
    assert not glob.glob(os.path.join(root, "longrange-knn-*")), "kNN memory files were left behind"


def test_pieces_stay_inside_one_segment():
    mask = torch.arange(13)[None].repeat(2, 1) % 3 > 0
    pieces = cut(13, 3, 5, mask)
    assert [(p.start, p.stop, p.offset, p.finish) for p in pieces] == [
        (0, 2, 3, True),
        (2, 7, 0, True),
        (7, 12, 0, True),
        (12, 13, 0, False),
    ]
    assert torch.equal(torch.cat([p.mask for p in pieces], dim=1), mask)
    assert [(p.width, p.finish) for p in cut(2, 1, 5)] == [(2, False)]
    assert [p.index for p in cut(10, 0, 5)] == [0, 1]


@pytest.mark.parametrize("family", list(OPTIONS))
def test_a_call_continues_its_state_in_place_and_ends_by_the_familys_policy(family):
    model = model_for(family)
    state = model.init_state(2)
    out = model.forward_lm(tokens(2, 13, seed=1), state=state)
    assert out.state is state and state.position == 13
    if family == "memorizing":  # the chunk is committed at the end of the call
        assert state.shared["open_length"] == 0
        assert all(layer["open"] is None for layer in state.layers)
    else:  # the block stays open for the next call, until a flush
        assert state.shared["open_length"] == 5 and state.layers[0]["open"].shape[-2] == 5
        window = state.layers[0]["xl"].shape[-2]
        assert model.flush(state) is state and state.shared["open_length"] == 0
        assert state.layers[0]["open"].shape[-2] == 0 and state.layers[0]["xl"].shape[-2] > window
    state.close()


@pytest.mark.parametrize("family", list(OPTIONS))
def test_a_saved_state_continues_bit_identically(family, tmp_path):
    model = model_for(family)
    x = tokens(2, 60, seed=2)
    x[0, 17] = 3  # an eos mid-document (memorizing: a new document starts after it)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 4:9] = False
    state = model.init_state(2)
    model.forward_lm(x[:, :21], mask=mask[:, :21], state=state)
    model.prefill(x[:, 21:27], state)  # decoding leaves the segment open (memorizing too)
    model.save_state(state, tmp_path / "state")
    loaded = model.load_state(tmp_path / "state", batch_size=2)
    assert loaded is not state and loaded.position == state.position == 27
    assert loaded.shared["open_length"] == state.shared["open_length"] > 0
    outs = []
    for s in (state, loaded):
        logits = [model.forward_lm(x[:, 27:45], mask=mask[:, 27:45], state=s).logits]
        logits.append(model.prefill(x[:, 45:50], s)[0])
        logits += [model.step(x[:, t], s)[0][:, None] for t in range(50, 60)]
        outs.append(torch.cat(logits, dim=1))
    assert torch.equal(outs[0], outs[1])
    if family == "memorizing":
        for mine, theirs in zip(loaded.shared["knn"], state.shared["knn"], strict=True):
            assert mine.directory != theirs.directory
            assert mine.db_offsets.tolist() == theirs.db_offsets.tolist()
    for s in (state, loaded):
        s.close()
    with pytest.raises(ValueError, match="batch rows"):
        model.load_state(tmp_path / "state", batch_size=3).close()


@pytest.mark.parametrize("family", list(OPTIONS))
def test_a_reset_forgets_the_open_segment_and_a_detach_cuts_the_graph(family):
    model = model_for(family).train()
    state = model.init_state(2)
    model.forward_lm(tokens(2, 12, seed=3), state=state)
    model.prefill(tokens(2, 3, seed=4), state)
    assert state.shared["open_mask"] is None
    assert model.reset_state_rows(state, torch.tensor([False, True])) is state
    open_mask = state.shared["open_mask"]
    assert open_mask.shape == (2, state.shared["open_length"])
    assert open_mask[0].all() and not open_mask[1].any()
    assert state.shared["xl_mask"][0].all() and not state.shared["xl_mask"][1].any()
    out = model.forward_lm(tokens(2, 6, seed=5), state=state)
    detached = model.detach_state(out.state)
    tensors = [t for layer in detached.layers for t in layer.values() if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.requires_grad for t in tensors)
    state.close()
