import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longrange.memory.knn import KNNMemory, KNNMemoryList

DIM = 16

# (backend, index, index_options): every index is searched exhaustively on small data.
BACKENDS = [
    pytest.param("exact", "flat", None, id="exact"),
    pytest.param("faiss", "flat", None, id="faiss-flat"),
    pytest.param("faiss", "hnsw", {"ef_search": 256, "hnsw_m": 16}, id="faiss-hnsw"),
    pytest.param("faiss", "ivf", {"nlist": 4, "nprobe": 4, "train_size": 24}, id="faiss-ivf"),
    # exact below 12 entries, then inverted files probed whole (so exact too)
    pytest.param("faiss", "auto", {"exact_limit": 12, "nprobe": 64}, id="faiss-auto"),
]


def _keys(n, rows=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, n, DIM, generator=gen), dim=-1)


def _pairs(keys):
    """Each value is a fixed function of its key, so a mismatched pair is detectable."""
    return torch.stack([keys, keys.flip(-1) * 2 + 1], dim=2)


def _matched(kv, mask):
    keys, values = kv[..., 0, :], kv[..., 1, :]
    return torch.allclose(values[mask], keys[mask].flip(-1) * 2 + 1, atol=1e-5)


def _memory(tmp_path, backend, index, options, *, max_memories=64, rows=2, name="m"):
    return KNNMemory(
        DIM,
        max_memories=max_memories,
        num_indices=rows,
        memmap_filename=tmp_path / name / "knn.memmap",
        multiprocessing=False,
        backend=backend,
        index=index,
        index_options=options,
    )


@pytest.mark.parametrize("backend,index,options", BACKENDS[1:])
def test_faiss_and_exact_return_the_same_neighbours(tmp_path, backend, index, options):
    keys = _keys(40)
    exact = _memory(tmp_path, "exact", "flat", None, name="exact")
    other = _memory(tmp_path, backend, index, options, name="other")
    for start in range(0, 40, 7):
        exact.add(_pairs(keys[:, start : start + 7]))
        other.add(_pairs(keys[:, start : start + 7]))
    queries = _keys(11, seed=1)[:, None]  # [B, 1, Q, D]
    kv_e, mask_e = exact.search(queries, 5)
    kv_o, mask_o = other.search(queries, 5)
    assert mask_e.all() and torch.equal(mask_e, mask_o)
    torch.testing.assert_close(kv_o, kv_e)
    assert kv_e.shape == (2, 1, 11, 5, 2, DIM)
    exact.close()
    other.close()


@pytest.mark.parametrize("backend,index,options", BACKENDS)
def test_wraparound_evicts_oldest_and_keeps_pairs_matched(tmp_path, backend, index, options):
    memory = _memory(tmp_path, backend, index, options, max_memories=8)
    keys = _keys(37)
    for start, size in ((0, 3), (3, 5), (8, 11), (19, 4), (23, 14)):  # one add larger than the memory
        memory.add(_pairs(keys[:, start : start + size]))
        kv, mask = memory.search(keys, 3)
        assert _matched(kv, mask), "a retrieved value does not belong to its key"
    top = kv[:, :, 0, 0]  # best neighbour's key for every query
    alive = (top - keys).abs().amax(dim=-1) < 1e-6
    assert alive[:, -8:].all(), "the 8 newest entries must be retrievable"
    assert not alive[:, :-8].any(), "evicted (oldest) entries must be gone"
    assert memory.db_offsets.tolist() == [37, 37]
    memory.close()


def _best_alive(queries, alive):
    """For each query [B, Q, D], the alive key [B, A, D] with the largest inner product."""
    best = torch.einsum("bqd,bad->bqa", queries, alive).argmax(dim=-1)
    return torch.gather(alive, 1, best[..., None].expand(-1, -1, alive.shape[-1]))


def test_reference_loses_key_value_match_on_wraparound(tmp_path):
    """The defect SPEC.md lists: when the reference's index overflows it is wiped and the next
    keys are numbered from 0 while their pairs go to later slots, so a key that the index still
    holds (but whose slot was overwritten) brings back another entry's pair. Exact search must
    return the best *alive* key for every query; ours does, the reference does not."""
    knn_memory = pytest.importorskip("memorizing_transformers_pytorch.knn_memory")
    ref = knn_memory.KNNMemory(
        DIM, max_memories=8, num_indices=2, memmap_filename=str(tmp_path / "r.memmap"), multiprocessing=False
    )
    ours = _memory(tmp_path, "faiss", "flat", None, max_memories=8)
    keys = _keys(19)
    for start, size in ((0, 3), (3, 5), (8, 5), (13, 6)):
        ref.add(_pairs(keys[:, start : start + size]))
        ours.add(_pairs(keys[:, start : start + size]))
    want = _best_alive(keys, keys[:, -8:])
    ref_kv, _ = ref.search(keys, 1)
    assert not torch.allclose(ref_kv[:, :, 0, 0], want), "reference defect gone?"
    kv, mask = ours.search(keys, 1)
    assert mask.all()
    torch.testing.assert_close(kv[:, :, 0, 0], want)
    ours.close()


@pytest.mark.parametrize("backend,index,options", BACKENDS[:3])
def test_clearing_a_row_leaves_the_others(tmp_path, backend, index, options):
    memory = _memory(tmp_path, backend, index, options, rows=3)
    keys = _keys(20, rows=3)
    memory.add(_pairs(keys))
    before, before_mask = memory.search(keys, 4)
    memory.clear([1])
    after, after_mask = memory.search(keys, 4)
    assert not after_mask[1].any() and not after[1].any()
    for row in (0, 2):
        assert torch.equal(after_mask[row], before_mask[row]) and torch.equal(after[row], before[row])
    assert memory.db_offsets.tolist() == [20, 0, 20]
    # The cleared row refills from slot 0 and only sees its new entries.
    memory.add(_pairs(_keys(20, rows=3, seed=5)))
    kv, mask = memory.search(keys, 4)
    assert mask[1].all() and _matched(kv, mask)
    assert memory.db_offsets.tolist() == [40, 20, 40]
    memory.close()


def test_scoped_rows_and_masked_adds(tmp_path):
    memory = _memory(tmp_path, "faiss", "flat", None, rows=3)
    keys = _keys(6, rows=2)
    keep = torch.tensor([[True, False, True, True, False, True], [False] * 6])
    with memory.at_batch_indices([2, 0]):
        memory.add(_pairs(keys), mask=keep)
        _, mask = memory.search(keys, 8)
    assert memory.db_offsets.tolist() == [0, 0, 4]
    assert mask[0].sum(-1).eq(4).all() and not mask[1].any()
    assert memory.scoped_indices == [0, 1, 2]
    with pytest.raises(ValueError, match="batch indices"):
        memory.set_scoped_indices([0, 3])
    memory.close()


@pytest.mark.parametrize("backend,index,options", BACKENDS)
def test_save_load_round_trip(tmp_path, backend, index, options):
    keys = _keys(30)
    original = _memory(tmp_path, backend, index, options, max_memories=32, name="a")
    original.add(_pairs(keys[:, :20]))
    original.clear(1)
    original.add(_pairs(keys[:, 20:]))
    original.save(tmp_path / "saved")
    copy = _memory(tmp_path, backend, index, options, max_memories=32, name="b")
    copy.load(tmp_path / "saved")
    assert copy.db_offsets.tolist() == original.db_offsets.tolist()
    for memory in (original, copy):  # both continue the same way after the round trip
        memory.add(_pairs(_keys(25, seed=3)))
    queries = _keys(9, seed=4)
    for got, want in zip(copy.search(queries, 6), original.search(queries, 6)):
        assert torch.equal(got, want)
    original.close()
    copy.close()


@pytest.mark.parametrize("backend,index,options", [BACKENDS[0], BACKENDS[2]])
def test_a_saved_list_reopens_as_a_new_list_beside_the_old_one(tmp_path, backend, index, options):
    home = tmp_path / "home"
    original = KNNMemoryList(
        KNNMemoryList.create_memories(batch_size=2, num_memory_layers=2, memories_directory=home / "own")(
            DIM, max_memories=16, backend=backend, index=index, index_options=options, remove_directory=True
        )
    )
    for i, memory in enumerate(original):
        memory.add(_pairs(_keys(20, seed=i)))
    original[1].clear(0)
    original.save(tmp_path / "saved")
    copy = KNNMemoryList.open_saved(tmp_path / "saved")
    assert copy[0].directory.parent == home.resolve() and copy[0].directory != original[0].directory
    assert (copy[0].directory / "OWNER").read_text() == str(os.getpid())
    assert [m.backend for m in copy] == [backend] * 2 and copy[0].index_kind == index
    queries = _keys(5, seed=7)
    for mine, theirs in zip(copy, original, strict=True):
        assert mine.db_offsets.tolist() == theirs.db_offsets.tolist()
        for got, want in zip(mine.search(queries, 4), theirs.search(queries, 4), strict=True):
            assert torch.equal(got, want)
    folder = copy[0].directory
    copy.close()
    original.close()
    assert not folder.exists() and list(home.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="kNN memory list"):
        KNNMemoryList.open_saved(tmp_path / "nothing")


def test_load_refuses_corrupt_or_foreign_directories(tmp_path):
    memory = _memory(tmp_path, "faiss", "flat", None, max_memories=16, name="a")
    memory.add(_pairs(_keys(5)))
    memory.save(tmp_path / "saved")
    other = _memory(tmp_path, "faiss", "flat", None, max_memories=32, name="b")
    with pytest.raises(ValueError, match="shape"):
        other.load(tmp_path / "saved")
    with pytest.raises(ValueError, match="no saved kNN memory"):
        memory.load(tmp_path / "nothing")
    meta = tmp_path / "saved" / "knn.memory.json"
    good = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        memory.load(tmp_path / "saved")
    meta.write_text(good)
    data = tmp_path / "saved" / "knn.memory.memmap"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        memory.load(tmp_path / "saved")
    assert memory.db_offsets.tolist() == [5, 5]  # a failed load leaves the memory unchanged
    memory.close()
    other.close()


def test_locked_directory_gives_a_clear_error(tmp_path):
    holder = textwrap.dedent(
        f"""
        import sys
        from filelock import FileLock
        lock = FileLock({str(tmp_path / ".knn.lock")!r})
        lock.acquire()
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="locked by another process"):
            KNNMemoryList.create_memories(batch_size=1, num_memory_layers=2, memories_directory=tmp_path)(
                dim=DIM, max_memories=8
            )
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    # Released: now it works, and one file cannot back two memories of this process.
    memories = KNNMemoryList.create_memories(batch_size=1, num_memory_layers=2, memories_directory=tmp_path)(
        dim=DIM, max_memories=8
    )
    with pytest.raises(ValueError, match="already used"):
        KNNMemory(DIM, max_memories=8, memmap_filename=memories[0].path)
    memories.cleanup()


def test_unwritable_directory_and_bad_inputs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="kNN memory directory"):
        KNNMemory(DIM, memmap_filename=blocker / "sub" / "knn.memmap")
    with pytest.raises(ValueError, match="max_memories"):
        KNNMemory(DIM, max_memories=0)
    with pytest.raises(ValueError, match="backend"):
        KNNMemory(DIM, backend="annoy")
    with pytest.raises(ValueError, match="index"):
        KNNMemory(DIM, backend="exact", index="hnsw")
    memory = KNNMemory(DIM, max_memories=8, num_indices=2)
    with pytest.raises(ValueError, match="memories must have shape"):
        memory.add(torch.zeros(3, 4, 2, DIM))
    with pytest.raises(ValueError, match="queries must have shape"):
        memory.search(torch.zeros(2, 4, DIM + 1), 2)
    memory.close()
    with pytest.raises(ValueError, match="closed"):
        memory.search(torch.zeros(2, 4, DIM), 2)


def test_cleanup_removes_every_file(tmp_path):
    memories = KNNMemoryList.create_memories(batch_size=2, num_memory_layers=2)(dim=DIM, max_memories=8)
    directory = memories[0].directory
    memories[0].add(_pairs(_keys(4)))
    # two memmaps, the lock and the owner marker (the creating process's id)
    assert len(list(directory.iterdir())) == 4
    assert (directory / "OWNER").read_text() == str(os.getpid())
    memories.cleanup()
    assert not directory.exists()
    given = KNNMemoryList.create_memories(
        batch_size=2, num_memory_layers=1, memories_directory=tmp_path / "d"
    )(dim=DIM, max_memories=8)
    given.cleanup()
    assert list((tmp_path / "d").iterdir()) == []
    # A memory that is never closed is cleaned up when it is collected.
    lost = KNNMemory(DIM, max_memories=8)
    path = lost.path
    del lost
    assert not path.exists() and not path.parent.exists()


def test_hnsw_drops_dead_entries_and_stays_bounded(tmp_path):
    memory = _memory(tmp_path, "faiss", "hnsw", {"ef_search": 64}, max_memories=10, rows=1)
    keys = _keys(200, rows=1)
    for start in range(0, 200, 7):
        memory.add(_pairs(keys[:, start : start + 7]))
        assert memory.index.indexes[0].ntotal < 2 * 10 + 7
    kv, mask = memory.search(keys, 3)
    assert _matched(kv, mask) and mask.all()
    top = kv[0, :, 0, 0]
    assert ((top - keys[0]).abs().amax(-1) < 1e-6).nonzero().flatten().tolist() == list(range(190, 200))
    memory.close()


def test_save_writes_index_and_counters(tmp_path):
    memory = _memory(tmp_path, "faiss", "flat", None, max_memories=8)
    memory.add(_pairs(_keys(11)))
    memory.save(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "knn.memory.json").read_text())
    assert meta["counts"] == [11, 11] and meta["shape"] == [2, 8, 2, DIM] and meta["dtype"] == "float32"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "knn.index.row0.faiss",
        "knn.index.row1.faiss",
        "knn.memory.json",
        "knn.memory.memmap",
    ]
    saved = np.fromfile(tmp_path / "out" / "knn.memory.memmap", dtype=np.float32).reshape(2, 2, 8, DIM)
    np.testing.assert_array_equal(saved.transpose(1, 2, 0, 3), memory.db)  # keys, then values
    memory.close()


def test_auto_index_is_exact_while_small_then_retrains_as_it_grows_and_turns_over(tmp_path):
    """Probing every cell makes the inverted file exact, so every search must equal the exact
    backend's, through the switch from exact search, the re-trainings as the fill doubles and
    the one after the whole memory has been overwritten."""
    options = {"exact_limit": 16, "cells_per_root": 1.0, "nprobe": 64}
    auto = _memory(tmp_path, "faiss", "auto", options, max_memories=48, rows=1, name="auto")
    exact = _memory(tmp_path, "exact", "flat", None, max_memories=48, rows=1, name="exact")
    keys = _keys(150, rows=1)
    queries = _keys(9, rows=1, seed=2)
    trained = []
    for start in range(0, 150, 10):
        before = auto.index.trained_count[0]
        for memory in (auto, exact):
            memory.add(_pairs(keys[:, start : start + 10]))
        assert auto.index.trained_count[0] == before  # an add never trains: the next search does
        for got, want in zip(auto.search(queries, 5), exact.search(queries, 5), strict=True):
            torch.testing.assert_close(got, want)
        trained.append(auto.index.trained_count[0])
    assert auto.index.indexes[0] is not None
    # exact until 16 entries, trained at 20 (fill 20), 40 (fill 40), then when 48 new entries
    # have replaced the 48 of the last training (count 40 + 48 -> at 90)
    assert sorted(set(trained)) == [0, 20, 40, 90, 140]
    auto.clear()
    assert auto.index.indexes[0] is None
    auto.close()
    exact.close()


def test_auto_index_saved_while_due_for_training_loads_and_searches_exactly(tmp_path):
    """A row saved between the add that made it due for training and its next search is
    written without its (outdated) index; the loaded memory trains it and searches as the
    exact backend does."""
    options = {"exact_limit": 16, "cells_per_root": 1.0, "nprobe": 64}
    auto = _memory(tmp_path, "faiss", "auto", options, max_memories=48, rows=1, name="auto")
    exact = _memory(tmp_path, "exact", "flat", None, max_memories=48, rows=1, name="exact")
    keys, queries = _keys(40, rows=1), _keys(9, rows=1, seed=2)
    for memory in (auto, exact):
        memory.add(_pairs(keys[:, :20]))
    auto.search(queries, 5)  # trained at 20 entries
    for memory in (auto, exact):
        memory.add(_pairs(keys[:, 20:]))  # 40: due again
    auto.save(tmp_path / "saved")
    auto.close()
    loaded = _memory(tmp_path, "faiss", "auto", options, max_memories=48, rows=1, name="loaded")
    loaded.load(tmp_path / "saved")
    for got, want in zip(loaded.search(queries, 5), exact.search(queries, 5), strict=True):
        torch.testing.assert_close(got, want)
    assert loaded.index.trained_count[0] == 40
    loaded.close()
    exact.close()


def test_auto_index_training_sample_does_not_alias_with_the_slot_order(tmp_path, monkeypatch):
    """The k-means sample must represent the memory whatever its order: with keys alternating
    between two groups, a fill where an evenly strided sample takes every other slot (1,024
    entries, 32 cells, 512 sampled) would train every centroid on one group only."""
    from longrange.memory.knn import adaptive

    samples = []
    train = adaptive.train_centroids
    monkeypatch.setattr(
        adaptive, "train_centroids", lambda keys, *a, **k: samples.append(keys) or train(keys, *a, **k)
    )
    options = {"exact_limit": 16, "cells_per_root": 1.0, "nprobe": 4}
    memory = _memory(tmp_path, "faiss", "auto", options, max_memories=1024, rows=1)
    keys = _keys(1024, rows=1)
    keys[:, 0::2] = F.normalize(keys[:, 0::2] * 0.3 + 1.0, dim=-1)  # even slots: near +(1, ..., 1)
    keys[:, 1::2] = F.normalize(keys[:, 1::2] * 0.3 - 1.0, dim=-1)  # odd slots: near -(1, ..., 1)
    memory.add(_pairs(keys))
    memory.search(_keys(4, rows=1, seed=1), 4)  # trains the row
    (sample,) = samples
    assert sample.shape == (512, DIM)
    odd = (sample.sum(-1) < 0).float().mean().item()
    assert 0.4 < odd < 0.6, odd
    memory.close()


def test_lookup_scores_are_the_inner_products_of_the_pairs_it_names(tmp_path):
    memory = _memory(tmp_path, "faiss", "auto", {"exact_limit": 8, "nprobe": 2}, max_memories=64)
    memory.add(_pairs(_keys(40)))
    queries = _keys(6, seed=3)[:, None]  # [B, 1, Q, D]
    ids, scores, found = memory.lookup(queries, 4)
    assert ids.shape == scores.shape == found.shape == (2, 1, 6, 4)
    keys = memory.key_table()[ids]
    torch.testing.assert_close(scores[found], torch.einsum("bhqd,bhqkd->bhqk", queries, keys)[found])
    kv, mask = memory.search(queries, 4)
    assert torch.equal(mask, found) and _matched(kv, mask)
    memory.close()


def test_auto_index_search_across_threads_equals_the_single_thread_search(tmp_path):
    memory = _memory(tmp_path, "faiss", "auto", {"exact_limit": 64, "nprobe": 4}, max_memories=4096, rows=1)
    memory.add(_pairs(_keys(3000, rows=1)))
    queries = _keys(700, rows=1, seed=5)
    across = memory.search(queries, 8)
    assert memory.index.indexes[0] is not None  # trained by that first search
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = memory.search(queries, 8)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(across, alone, strict=True):
        assert torch.equal(got, want)
    memory.close()


def test_auto_index_chooses_the_same_cells_in_any_blocks_of_queries(tmp_path, monkeypatch):
    from longrange.memory.knn import adaptive

    memory = _memory(tmp_path, "faiss", "auto", {"exact_limit": 64, "nprobe": 4}, max_memories=4096, rows=1)
    memory.add(_pairs(_keys(3000, rows=1)))
    queries = _keys(300, rows=1, seed=6)
    whole = memory.search(queries, 8)
    monkeypatch.setattr(adaptive, "PROBE_QUERIES", 7)  # 43 blocks, the last of 6
    blocks = memory.search(queries, 8)
    for got, want in zip(blocks, whole, strict=True):
        assert torch.equal(got, want)
    memory.close()


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong width"])
def test_auto_index_with_damaged_centroids_retrains_from_the_store(tmp_path, damage):
    """A row's saved centroids that cannot be read (cut short, gone, or for another key width)
    are not trusted: the loaded row is trained again from the stored pairs and searches as
    the exact backend does."""
    options = {"exact_limit": 16, "cells_per_root": 1.0, "nprobe": 64}
    auto = _memory(tmp_path, "faiss", "auto", options, max_memories=48, rows=1, name="auto")
    exact = _memory(tmp_path, "exact", "flat", None, max_memories=48, rows=1, name="exact")
    keys, queries = _keys(30, rows=1), _keys(9, rows=1, seed=2)
    for memory in (auto, exact):
        memory.add(_pairs(keys))
    auto.search(queries, 5)  # trained
    auto.save(tmp_path / "saved")
    auto.close()
    centroids = tmp_path / "saved" / "knn.index.row0.centroids.npy"
    if damage == "truncated":
        centroids.write_bytes(centroids.read_bytes()[:-7])
    elif damage == "missing":
        centroids.unlink()
    else:
        np.save(centroids, np.zeros((3, DIM + 1), dtype=np.float32), allow_pickle=False)
    loaded = _memory(tmp_path, "faiss", "auto", options, max_memories=48, rows=1, name="loaded")
    loaded.load(tmp_path / "saved")
    assert loaded.index.indexes[0] is not None
    for got, want in zip(loaded.search(queries, 5), exact.search(queries, 5), strict=True):
        torch.testing.assert_close(got, want)
    loaded.close()
    exact.close()


def test_tables_handed_out_outlive_close(tmp_path):
    """A key or value table a retrieval handed out (saved for a backward pass) stays readable
    after the memory is closed and its file deleted: the mapping goes with its last view.
    (Closing used to unmap it, and reading such a view crashed the process.)"""
    memory = _memory(tmp_path, "exact", "flat", None, max_memories=16, rows=1)
    keys = _keys(10, rows=1)
    memory.add(_pairs(keys))
    key_table, value_table = memory.key_table(), memory.value_table()
    path = memory.path
    memory.close()
    assert not path.exists()
    assert torch.equal(key_table[:10], keys[0]) and torch.equal(value_table[:10], keys[0].flip(-1) * 2 + 1)
    with pytest.raises(ValueError, match="closed"):
        memory.key_table()


def test_copying_or_pickling_a_memory_is_refused_naming_the_way_to_copy(tmp_path):
    """A memory is its file: copy.deepcopy used to return a memory that read as closed (and
    failed at its first use), pickle failed on a weak reference deep inside; both now say
    how to copy one. The original is left as it was."""
    import copy
    import pickle

    memory = _memory(tmp_path, "exact", "flat", None, max_memories=16, rows=1)
    memory.add(_pairs(_keys(5, rows=1)))
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps, lambda m: copy.deepcopy(KNNMemoryList([m]))):
        with pytest.raises(TypeError, match="cannot be copied or pickled: save"):
            attempt(memory)
    assert memory.lookup(_keys(1, rows=1)[:, :1], 2)[2].all()
    memory.close()


@pytest.mark.parametrize("fills", [(27, 3), (1, 20)], ids=["27-3", "1-20"])
def test_auto_index_equals_exact_backend_bit_for_bit_while_small(tmp_path, fills):
    """Below ``exact_limit`` the ``auto`` index is the exact search: the same ids and the same
    scores, to the last bit, as ``backend="exact"``, also with rows filled unequally and few
    queries (a decoding step). It searched row by row, products of other shapes than the
    exact backend's one product, and the scores differed in the last bit."""
    gen = torch.Generator().manual_seed(0)
    pairs = torch.randn(2, max(fills), 2, DIM, generator=gen)
    mask = torch.arange(max(fills))[None, :] < torch.tensor(fills)[:, None]
    exact = _memory(tmp_path, "exact", "flat", None, name="exact")
    auto = _memory(tmp_path, "faiss", "auto", None, name="auto")
    for memory in (exact, auto):
        memory.add(pairs, mask)
    for queries in (7, 2):
        q = torch.randn(2, queries, DIM, generator=gen)
        for got, want in zip(auto.lookup(q, 4), exact.lookup(q, 4), strict=True):
            assert torch.equal(got, want)
    exact.close()
    auto.close()


@pytest.mark.parametrize(
    "rows",
    [torch.tensor([False, True]), np.array([False, True]), [True], 1.0, [0.0, 1.0]],
    ids=["bool-tensor", "bool-array", "bool-list", "float", "float-list"],
)
def test_clear_refuses_a_mask_or_floats_as_row_indices(tmp_path, rows):
    """A mask of rows (or floats) given as batch_indices is refused naming the argument: it
    used to be cast to ints, so a mask [False, True] cleared row 0 and left row 1."""
    memory = _memory(tmp_path, "exact", "flat", None)
    memories = KNNMemoryList([memory])
    memory.add(_pairs(_keys(5)))
    with pytest.raises(TypeError, match="batch_indices"):
        memory.clear(rows)
    with pytest.raises(TypeError, match="batch_indices"):
        memories.clear_memory(rows)
    with pytest.raises(TypeError, match="memory_indices"):
        memories.clear_memory(1, memory_indices=[True])
    with pytest.raises(TypeError, match="batch indices"):
        memory.set_scoped_indices(rows)
    assert memory.db_offsets.tolist() == [5, 5]
    memory.clear(torch.tensor([1]))  # integer tensors, numpy integers and ranges are indices
    memory.clear(np.int64(0))
    assert memory.db_offsets.tolist() == [0, 0]
    memory.close()
