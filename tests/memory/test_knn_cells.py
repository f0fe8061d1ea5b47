"""The inverted file of the auto kNN index (memory/knn/cells.py): the compiled scan against its
torch reference, and the lists against an oracle that remembers every key by slot."""

import pytest
import torch
import torch.nn.functional as F

from longrange.memory.knn import cells as cells_module
from longrange.memory.knn.cells import BLOCK, CellLists, nearest_cells, scan_available, search_reference


def _unit(n, dim, seed):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _lists(n, dim, cells, capacity, seed=0):
    keys = _unit(n, dim, seed)
    centroids = _unit(cells, dim, seed + 100)
    lists = CellLists(centroids, capacity)
    slots = torch.randperm(capacity, generator=torch.Generator().manual_seed(seed))[:n]
    lists.build(slots, keys, nearest_cells(keys, centroids))
    return lists, dict(zip(slots.tolist(), keys, strict=True))


def _probes(queries, centroids, p):
    return (queries @ centroids.T).topk(p, dim=1, sorted=False).indices


def _oracle(held: dict, centroids, queries, probes, k):
    """Top-k by brute force over the held keys whose cell is probed."""
    slots = torch.tensor(sorted(held))
    keys = torch.stack([held[s] for s in slots.tolist()])
    cell = nearest_cells(keys, centroids)
    scores = queries @ keys.T
    allowed = (cell[None, :, None] == probes[:, None, :]).any(-1)
    scores = scores.masked_fill(~allowed, -torch.inf)
    top = scores.topk(min(k, len(slots)), dim=1)
    found = slots[top.indices].masked_fill(top.values == -torch.inf, -1)
    return found, top.values


def _same(got, want):
    """Equal neighbours (slots and scores), up to float rounding of the scores."""
    (g_slots, g_scores), (w_slots, w_scores) = got, want
    kept = w_slots.shape[1]
    assert torch.equal(g_slots[:, :kept], w_slots)
    torch.testing.assert_close(g_scores[:, :kept], w_scores, atol=1e-5, rtol=0)
    assert (g_slots[:, kept:] == -1).all() and (g_scores[:, kept:] == -torch.inf).all()


@pytest.mark.parametrize("dim", [64, 10])
@pytest.mark.parametrize("threads", [1, 2])
def test_scan_equals_the_reference_and_the_oracle(dim, threads):
    """Both the compiled scan (when it builds here) and the torch reference find each query's
    best keys among its probed cells; dim 10 takes the scan's remainder loop."""
    assert scan_available() or cells_module.LIBRARY.unavailable  # a build failure says why
    lists, held = _lists(700, dim, 24, 1024, seed=dim)
    queries = _unit(90, dim, seed=7)
    probes = _probes(queries, lists.centroids, 5)
    want = _oracle(held, lists.centroids, queries, probes, 12)
    _same(lists.search(queries, probes, 12, threads=threads), want)
    _same(search_reference(lists, queries, probes, 12), want)


def test_fewer_candidates_than_k_and_unused_probes_pad_with_minus_one():
    lists, held = _lists(20, 16, 8, 64, seed=1)
    queries = _unit(6, 16, seed=2)
    probes = _probes(queries, lists.centroids, 2)
    probes[:, 1] = -1  # a probe slot with no cell
    want = _oracle(held, lists.centroids, queries, probes[:, :1], 40)
    for got in (lists.search(queries, probes, 40), search_reference(lists, queries, probes, 40)):
        _same(got, want)


def test_adds_removes_and_overflow_rebuilds_keep_exactly_the_held_keys():
    """Keys added by slot (replacing what a slot held), removed, and enough added into one
    cell to overflow its room: the search always equals the oracle over what is held, and
    every slot found names the key it was scored against."""
    dim, capacity = 16, 512
    lists, held = _lists(100, dim, 6, capacity, seed=3)
    gen = torch.Generator().manual_seed(4)
    for step in range(12):
        slots = torch.randperm(capacity, generator=gen)[:40]
        keys = _unit(40, dim, seed=50 + step)
        if step == 5:  # all near one centroid: its cell overflows and the lists rebuild
            keys = F.normalize(lists.centroids[0] + 0.05 * keys, dim=-1)
        lists.add(slots, keys)
        held.update(zip(slots.tolist(), keys, strict=True))
        gone = torch.randperm(capacity, generator=gen)[:15]
        lists.remove(gone)
        for slot in gone.tolist():
            held.pop(slot, None)
        assert len(lists) == len(held)
        queries = _unit(30, dim, seed=90 + step)
        probes = _probes(queries, lists.centroids, 3)
        got = lists.search(queries, probes, 10)
        _same(got, _oracle(held, lists.centroids, queries, probes, 10))
        found = got[0] >= 0
        named = torch.stack([held[s] for s in got[0][found].tolist()])
        asked = queries[:, None].expand(-1, 10, -1)[found]
        torch.testing.assert_close(got[1][found], (asked * named).sum(-1))


@pytest.mark.parametrize("budget", [32 << 20, 1])
def test_without_the_compiled_scan_the_reference_answers(monkeypatch, budget):
    """Also with the queries in blocks of one (a tiny gathering budget)."""
    lists, held = _lists(300, 32, 10, 512, seed=5)
    queries = _unit(40, 32, seed=6)
    probes = _probes(queries, lists.centroids, 3)
    want = _oracle(held, lists.centroids, queries, probes, 8)
    monkeypatch.setattr(cells_module, "_load", lambda: None)
    monkeypatch.setattr(cells_module, "REFERENCE_BYTES", budget)
    _same(lists.search(queries, probes, 8), want)


def test_the_layout_is_blocks_of_keys_as_columns():
    """A key sits in one column of a [D, 16] block of its cell, and its slot beside it."""
    lists, held = _lists(50, 8, 4, 128, seed=8)
    for slot, key in held.items():
        column = int(lists.column[slot])
        assert int(lists.slots[column]) == slot
        assert torch.equal(lists.keys[column // BLOCK, :, column % BLOCK], key)
        cell = int(lists.cell_of[slot])
        assert lists.first[cell] * BLOCK <= column < (lists.first[cell] + lists.room[cell]) * BLOCK


@pytest.mark.parametrize("k", [1, 24, 60])
def test_probe_cells_are_the_top_k_columns(k):
    from longrange.memory.knn.cells import probe_cells
    from longrange.ops.select import top_k_columns

    scores = torch.randn(300, 61 if k == 60 else 1448, generator=torch.Generator().manual_seed(k))
    scores[:7, :] = -torch.inf  # rows of no score still name k columns
    got = probe_cells(scores, k, threads=2)
    want = top_k_columns(scores, k)
    assert got.shape == (300, k)
    assert torch.equal(got[7:].sort(dim=1).values, want[7:].sort(dim=1).values)
    assert all(len(set(row.tolist())) == k for row in got)
    with pytest.raises(ValueError, match="k must be"):
        probe_cells(scores, scores.shape[1] + 1)


def test_probe_cells_with_nan_scores_still_name_distinct_columns():
    from longrange.memory.knn.cells import probe_cells

    scores = torch.randn(4, 400, generator=torch.Generator().manual_seed(0))
    scores[0] = torch.nan
    scores[1, ::3] = torch.nan
    got = probe_cells(scores, 24)
    assert ((got >= 0) & (got < 400)).all()
    assert all(len(set(row.tolist())) == 24 for row in got)
    want = scores[2:].topk(24, dim=1).indices.sort(dim=1).values
    assert torch.equal(got[2:].sort(dim=1).values, want)


def test_a_scan_that_cannot_be_built_says_why_once_and_the_reference_answers(tmp_path, monkeypatch):
    lists, held = _lists(200, 16, 6, 256, seed=9)
    queries = _unit(20, 16, seed=10)
    probes = _probes(queries, lists.centroids, 2)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LONGRANGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cells_module.LIBRARY, "library", None)
    monkeypatch.setattr(cells_module.LIBRARY, "unavailable", None)
    with pytest.warns(RuntimeWarning, match="compiled scan is unavailable .*compiler"):
        got = lists.search(queries, probes, 5)
    assert not scan_available() and "compiler" in cells_module.LIBRARY.unavailable
    _same(got, _oracle(held, lists.centroids, queries, probes, 5))


@pytest.mark.parametrize("dim", [64, 10])
def test_compiled_placement_equals_the_reference(dim):
    """Keys appended to their cells by the compiled loop land where the torch reference puts
    them (the layout, the slots, each slot's column and cell, the fills), in their order within
    a cell; a placement that would overflow a cell writes nothing and says so."""
    if not scan_available():
        pytest.skip(f"the compiled kNN helpers cannot be built here: {cells_module.LIBRARY.unavailable}")
    compiled, _ = _lists(300, dim, 9, 2048, seed=dim)
    plain, _ = _lists(300, dim, 9, 2048, seed=dim)
    keys = _unit(40, dim, seed=dim + 1)
    slots = torch.arange(1500, 1540)
    cells = nearest_cells(keys, compiled.centroids)
    assert compiled._place(slots, keys, cells) and plain._place_reference(slots, keys, cells)
    for name in ("keys", "slots", "column", "cell_of", "filled"):
        assert torch.equal(getattr(compiled, name), getattr(plain, name)), name
    crowd = torch.zeros(int(compiled.room[0]) * BLOCK, dtype=torch.long)  # more than cell 0 holds
    before = [getattr(compiled, name).clone() for name in ("keys", "slots", "column", "cell_of", "filled")]
    many = _unit(len(crowd), dim, seed=3)
    assert not compiled._place(torch.arange(len(crowd)) + 1600, many, crowd)
    assert not plain._place_reference(torch.arange(len(crowd)) + 1600, many, crowd)
    for name, old in zip(("keys", "slots", "column", "cell_of", "filled"), before, strict=True):
        assert torch.equal(getattr(compiled, name), old), name


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cell_probed_twice_is_read_twice_as_the_reference_reads_it(threads):
    """Probes are distinct when the index picks them; given twice by a caller, each copy of a
    cell is scanned (duplicate candidates, as in the reference), never two scores written to
    one place (grouping a query with itself overran its scratch)."""
    lists, _ = _lists(300, 16, 8, 512, seed=3)
    queries = _unit(10, 16, seed=4)
    for row in ([0, 0, 1], [2, 2, 2], [3, -1, 3]):
        probes = torch.tensor([row] * len(queries))
        got = lists.search(queries, probes, 5, threads=threads)
        want = search_reference(lists, queries, probes, 5)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_search_refuses_queries_or_probes_of_the_wrong_shape():
    """Checked before the scan, which reads both by the lists' sizes (a narrower query or fewer
    probe rows used to be read past their end)."""
    lists, _ = _lists(50, 16, 4, 64, seed=5)
    with pytest.raises(ValueError, match=r"queries must be \[Q, 16\], got \[3, 8\]"):
        lists.search(torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"probes must be integer cells \[Q = 3, P\]"):
        lists.search(torch.randn(3, 16), torch.zeros(2, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="probes must be integer cells"):
        lists.search(torch.randn(3, 16), torch.zeros(3, 2), 4)
