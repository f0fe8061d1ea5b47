import pytest
import torch

from longrange.ops.select import argmax_last, top_k, top_k_columns, top_k_rows


@pytest.mark.parametrize("width", [64, 255, 256, 300, 1448, 2047, 2048, 2100, 4097])
def test_grouped_argmax_is_torch_argmax_ties_and_nan_included(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randint(-3, 4, (2, 3, 257, width), generator=g).float()  # many ties per row
    x[0, 0, 0] = float("-inf")
    x[0, 0, 1, width // 2] = float("nan")
    x[1, 2, 5, -1] = 9.0  # the maximum in the last group (or the tail)
    x[1, 2, 6, -1] = float("nan")  # a NaN only in the last column
    for t in (x, x.transpose(1, 2), -x, torch.randn(4, width, generator=g)):
        assert torch.equal(argmax_last(t), t.argmax(dim=-1))


@pytest.mark.parametrize(("cells", "k"), [(1448, 24), (2896, 24), (383, 24), (384, 24), (1000, 7), (64, 24)])
def test_top_k_columns_are_the_top_k_set(cells, k):
    g = torch.Generator().manual_seed(cells)
    scores = torch.randn(300, cells, generator=g)
    scores[0, -k:] += 100  # the best k together at the end, next to the padding
    scores[1, :: cells // 8] += 100  # the best spread over the strided runs
    got = top_k_columns(scores, k)
    want = scores.topk(k, dim=1).indices
    assert got.shape == (300, k) and got.dtype == torch.long
    assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)


@pytest.mark.parametrize(("cells", "k"), [(1024, 32), (4097, 32), (100, 32), (32, 32)])
def test_top_k_is_torch_topk_best_first(cells, k):
    g = torch.Generator().manual_seed(cells)
    scores = torch.randn(2, 150, cells, generator=g)
    scores[0, 0, k // 2 :] = float("-inf")  # fewer finite scores than k
    scores[1, 3] = scores[1, 3].round()  # ties
    values, indices = top_k(scores, k)
    want = scores.topk(k, dim=-1)
    assert indices.shape == (2, 150, k) and indices.dtype == torch.long
    assert torch.equal(values, want.values)
    assert torch.equal(scores.gather(-1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices.flatten(0, 1))  # k distinct columns


@pytest.mark.parametrize(("rows", "k"), [(8192, 64), (1030, 64), (1021, 16), (300, 32), (64, 64)])
def test_top_k_rows_is_torch_topk_along_rows_best_first(rows, k):
    """Per column: the same values best first (ties and -inf padding included) and k distinct
    rows holding them; the strided groups' edge cases (the best together at the end, next to
    the -inf padding rows; spread one per slab)."""
    g = torch.Generator().manual_seed(rows)
    scores = torch.randn(2, 3, rows, 40, generator=g)
    scores[0, 0, -k:, 0] += 100
    scores[0, 0, :: max(1, rows // 8), 1] += 100
    scores[0, 1, k // 2 :, 2] = float("-inf")  # fewer finite scores than k
    scores[1, 2, :, 3] = scores[1, 2, :, 3].round()  # ties
    got = top_k_rows(scores, k)
    want = scores.topk(k, dim=-2)
    assert got.shape == (2, 3, k, 40) and got.dtype == torch.long
    assert torch.equal(scores.gather(-2, got), want.values)
    distinct = got.transpose(-1, -2).flatten(0, 2)
    assert all(len(set(column.tolist())) == k for column in distinct)


@pytest.mark.parametrize("shape", [(0, 40), (2, 0, 40)], ids=["no-rows", "no-queries"])
def test_top_k_of_no_queries_is_empty(shape):
    values, indices = top_k(torch.randn(*shape), 2)
    assert values.shape == indices.shape == (*shape[:-1], 2)


@pytest.mark.parametrize("shape", [(0, 40, 3), (2, 40, 0)], ids=["no-batch", "no-columns"])
def test_top_k_rows_of_no_columns_is_empty(shape):
    assert top_k_rows(torch.randn(*shape), 2).shape == (*shape[:-2], 2, shape[-1])
