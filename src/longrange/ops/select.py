"""Selection kernels that return what torch's argmax and topk return, faster on CPU for wide
rows: the k-means assignment of the Routing Transformer (a row per point, a column per
cluster), the kNN index's cell of each key and its choice of cells to probe (a row per
query, a column per cell), and the exact kNN search's best entries (a column per entry).
torch's own kernels are the plain references beside them (tests compare the two)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# rows at least this wide take :func:`argmax_last`'s grouped path, in groups of ARGMAX_GROUP
# entries (ARGMAX_WIDE_GROUP from ARGMAX_WIDE on: 0.83 against 0.98 ms for [1024, 2048]);
# narrower rows take max's indices, faster below 2048 columns: [512, 1448] (the kNN cells of
# a chunk's keys) 0.22 against 0.47 ms, [4, 4096, 256] 1.7 against 2.7 ms; at [1024, 2048]
# the grouped path 0.52 against 0.58, at [1024, 3072] 0.63 against 0.85 ms
ARGMAX_GROUPED_FROM = 2048
ARGMAX_GROUP = 32
ARGMAX_WIDE = 1024
ARGMAX_WIDE_GROUP = 64


def argmax_last(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)``, the same indices (the first of equal maxima, NaN counting as the
    largest), faster on CPU, where torch's argmax over the last dimension runs 2-3x slower
    than its max (which also returns indices, argmax's): rows narrower than
    ARGMAX_GROUPED_FROM take max's indices; wider rows (many clusters or cells) the maximum of
    each group of entries, the first group holding the row's maximum, then the first index of
    it inside that group. Every earlier group's maximum is smaller, so the index is argmax's.
    Columns past the last whole group are a tail of their own, which wins only with a larger
    maximum (or the row's only NaN). [1024, 3072]: 0.63 ms against max's 0.85 and argmax's
    2.2."""
    width = x.shape[-1]
    if x.device.type != "cpu":
        return x.argmax(dim=-1)
    if width < ARGMAX_GROUPED_FROM:
        # max's indices are argmax's (the first maximum, NaN the largest): 4.4 against 8.9 ms
        # for [1, 4, 16384, 128]
        return x.max(dim=-1).indices
    size = ARGMAX_WIDE_GROUP if width >= ARGMAX_WIDE else ARGMAX_GROUP
    whole = width - width % size
    groups = x[..., :whole].unflatten(-1, (whole // size, size))
    tops = groups.amax(dim=-1)
    top = tops.argmax(dim=-1, keepdim=True)  # [..., 1]
    picked = groups.gather(-2, top[..., None].expand(*top.shape, size)).squeeze(-2)
    index = top.squeeze(-1) * size + picked.argmax(dim=-1)
    if whole == width:
        return index
    best = tops.gather(-1, top).squeeze(-1)
    tail = x[..., whole:].max(dim=-1)
    later = (tail.values > best) | (tail.values.isnan() & ~best.isnan())
    return torch.where(later, tail.indices + whole, index)


# top_k_columns' strides: a query's scores are cut into CELL_STRIDES interleaved runs
CELL_STRIDES = 8


def top_k_columns(scores: Tensor, k: int) -> Tensor:
    """The columns of the k largest of each row of scores [Q, C], in no order: the set of
    ``scores.topk(k, sorted=False)`` (which of equal scores is taken may differ).

    torch's CPU top-k over a long row costs about twice as much at k = 24 as at k = 16
    (2048 x 1448 scores: 13-15 ms, the largest single kernel of a memorizing chunk at 32K
    memories). Instead, with the row laid out as CELL_STRIDES runs of G = C / CELL_STRIDES,
    the columns j, j + G, j + 2G, ... form a group, whose maximum is one vectorised max over
    the runs: a top-k of the G group maxima picks k groups, and a top-k of their k x
    CELL_STRIDES scores picks the answer (an entry of any other group has k groups of larger
    maxima, so k larger scores, above it). 2048 x 1448 at k = 24: 5.8 ms."""
    q, c = scores.shape
    if scores.device.type != "cpu" or c < 16 * k or q == 0:
        return scores.topk(k, dim=1, sorted=False).indices
    if c % CELL_STRIDES:  # -inf padding: never above a real score, as k <= C
        scores = torch.nn.functional.pad(scores, (0, -c % CELL_STRIDES), value=-math.inf)
    runs = scores.view(q, CELL_STRIDES, -1)  # [Q, S, G]
    groups = runs.amax(dim=1).topk(k, dim=1, sorted=False).indices  # [Q, k]
    picked = runs.gather(2, groups[:, None, :].expand(q, CELL_STRIDES, k)).view(q, -1)
    best = picked.topk(k, dim=1, sorted=False).indices  # into [S, k], run-major
    return (best // k) * runs.shape[2] + groups.gather(1, best % k)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, dim=-1)`` for scores [..., C]: (values, indices), best first, the same
    values (which of equal scores is taken may differ), through :func:`top_k_columns` and a
    sort of the k picks. The exact kNN search over 2048 queries: 55 -> 32 ms at 16K entries,
    164 -> 88 ms at 64K."""
    lead, c = scores.shape[:-1], scores.shape[-1]
    flat = scores.reshape(-1, c)
    columns = top_k_columns(flat, k)
    values, order = flat.gather(1, columns).sort(dim=1, descending=True)
    return values.view(*lead, k), columns.gather(1, order).view(*lead, k)


# top_k_rows' slabs: the N rows of a column are cut into ROW_SLABS contiguous slabs
ROW_SLABS = 8


def top_k_rows(scores: Tensor, k: int) -> Tensor:
    """``scores.topk(k, dim=-2).indices`` for scores [..., N, C]: the rows of the k largest of
    each column, best first ([..., k, C]; which of equal scores is taken may differ).

    The balanced Routing Transformer takes, for each cluster (a column), its window of nearest
    tokens (rows): torch's CPU top-k along a dimension that is not the last ran 21 ms for
    [1, 4, 8192, 128] at k = 64 (13% of the step at the package's defaults), and laying the
    columns out as rows first costs 15 ms more (a transposing copy). Instead, with the rows
    cut into ROW_SLABS contiguous slabs of G = N / ROW_SLABS, rows j, j + G, j + 2G, ... form
    a group whose maximum is one contiguous max over the slabs: a top-k of the G group maxima
    picks k groups, and a top-k of their k x ROW_SLABS scores the answer (as in
    :func:`top_k_columns`). 21.4 -> 7.6 ms."""
    n = scores.shape[-2]
    if scores.device.type != "cpu" or n < 16 * k or scores.numel() == 0:
        return scores.topk(k, dim=-2).indices
    if n % ROW_SLABS:  # -inf padding rows: never above a real score, as k <= N
        scores = torch.nn.functional.pad(scores, (0, 0, 0, -n % ROW_SLABS), value=-math.inf)
    lead, c = scores.shape[:-2], scores.shape[-1]
    slabs = scores.reshape(-1, ROW_SLABS, scores.shape[-2] // ROW_SLABS, c)  # [P, S, G, C]
    p, g = slabs.shape[0], slabs.shape[2]
    groups = slabs.amax(dim=1).topk(k, dim=1, sorted=False).indices  # [P, k, C]
    picked = slabs.gather(2, groups[:, None].expand(p, ROW_SLABS, k, c)).view(p, ROW_SLABS * k, c)
    best = picked.topk(k, dim=1).indices  # into [S, k], slab-major, best first
    rows = (best // k) * g + groups.gather(1, best % k)
    return rows.view(*lead, k, c)
