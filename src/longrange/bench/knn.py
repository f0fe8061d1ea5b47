"""``longrange bench knn``: the kNN memory as it fills, and the memorizing reference at it.

For each memory fill F (``--lengths``, default 0, 32768 and 250000 entries): a
``MemorizingTransformer`` built as a user builds it, with the reference's defaults at the
benchmark size (dim 256, depth 4, heads 4, dim_head 64; its kNN memory at the default
250,000 entries, the index chosen by size), has its memory filled by reading the built-in
corpus chunk by chunk (512 tokens, no gradients) until the memorizing layer holds F entries;
then one 512-token chunk is timed, forward and backward (one warm-up, the median of
``repeats``). Reported per fill:

- ``chunk_s`` and ``relative_to_empty``: the chunk's time over the time at fill 0;
- ``recall_at_k``: of the k pairs exact search finds for the next chunk's own queries (the
  memorizing layer's, all heads), the fraction the memory's index returns, and the index in
  use (``exact`` or ``ivf`` with its cells and probed cells);
- with ``--compare-reference``, memorizing-transformers-pytorch's ``MemorizingTransformer``
  with the same keywords, filled with the same text and timed the same way in a child process
  once all of ours are done (``reference_chunk_s``, ``speedup``: reference time over ours),
  and the recall@k of the reference's own index measured the same way
  (``reference_recall_at_k``). Read its times
  with that recall: its index is an HNSW graph at faiss's default search depth, and it
  empties the graph once it holds more than ``max_memories`` entries, so from the default
  250,000 on it searches a nearly empty graph whose labels no longer name the slots of its
  memory file.

A full run fills 250,000 entries twice (ours, then the reference): minutes on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from longrange.bench.device import environment
from longrange.bench.memory import run_child
from longrange.bench.results import merge_results, results_path

CHUNK = 512
TOP_K = 32  # the reference's num_retrieved_memories
SIZE = {"num_tokens": 256, "dim": 256, "depth": 4, "heads": 4, "dim_head": 64}
DEFAULT_FILLS = (0, 32768, 250000)


def corpus_tokens(count: int) -> torch.Tensor:
    """The first ``count`` tokens of the built-in corpus's training documents, [1, count]."""
    from longrange.data.corpus import builtin_corpus

    stream = builtin_corpus().train_stream()
    reps = -(-count // max(1, len(stream)))
    return torch.from_numpy(np.tile(stream, reps)[:count].astype(np.int64))[None]


def _chunk_times(steps, tokens: torch.Tensor, starts: list[int], repeats: int) -> list[list[float]]:
    """For each step (a training step on a chunk [1, CHUNK + 1]), the times of ``repeats``
    chunks read from its start on: the steps take turns, a chunk each per round, after a
    warm-up round, so that the machine's drift reaches them alike."""
    times: list[list[float]] = [[] for _ in steps]
    for r in range(repeats + 1):
        for step, start, spent in zip(steps, starts, times):
            piece = tokens[:, start + r * CHUNK : start + (r + 1) * CHUNK + 1]
            begin = time.perf_counter()
            step(piece)
            if r:  # the first round is the warm-up
                spent.append(time.perf_counter() - begin)
    return times


def _first_queries(memory, method: str, run) -> torch.Tensor | None:
    """The queries [Q, D] of the first call of ``memory.<method>`` while ``run()`` runs (the
    call itself goes through), or None when it is not called."""
    captured: list[torch.Tensor] = []
    original = getattr(memory, method)

    def recording(queries, *args, **options):
        captured.append(queries.detach().reshape(-1, queries.shape[-1]))
        return original(queries, *args, **options)

    setattr(memory, method, recording)
    try:
        run()
    finally:
        setattr(memory, method, original)
    return captured[0] if captured else None


def _hit_rate(got, want) -> float:
    """Of the slots exact search found (rows of ``want``, -1: none), the fraction that the
    rows of ``got`` also name."""
    hits = [len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(got, want)]
    return sum(hits) / max(1, sum(int((w >= 0).sum()) for w in want))


def _recall(memory, queries: torch.Tensor) -> float:
    """recall@k of the memory's lookup against exact search over the same entries."""
    from longrange.memory.knn.exact import exact_search

    store = memory.store
    filled = np.minimum(store.counts, store.capacity)
    got, _, found = memory.lookup(queries[None], TOP_K)
    want, _ = exact_search(store.keys(), filled, queries[None].float(), TOP_K)
    return _hit_rate((got[0] % store.capacity).masked_fill(~found[0], -1), want[0])


def _fill_ours(model, memories, tokens: torch.Tensor, fill: int) -> dict[str, Any]:
    """Fill ``memories`` with the first ``fill`` tokens (no gradients); measure the recall of
    the next chunk's queries (searched without adding the chunk) and name the index."""
    with torch.no_grad():
        for start in range(0, fill, CHUNK):
            model(tokens[:, start : start + CHUNK], memories)
    memory = memories[0]

    def next_chunk():
        with torch.no_grad():
            model(tokens[:, fill : fill + CHUNK], memories, add_knn_memory=False)

    queries = _first_queries(memory, "lookup", next_chunk)
    recall = _recall(memory, queries) if queries is not None and fill else None
    index = memory.index
    kind = "exact"
    ivf = getattr(index, "indexes", [None])[0]
    if ivf is not None and hasattr(ivf, "cells"):
        kind = f"ivf {ivf.cells} cells, {min(index.nprobe, ivf.cells)} probed"
    return {"fill": fill, "recall_at_k": recall, "k": TOP_K, "index": kind}


def ours_points(fills: list[int], repeats: int) -> list[dict[str, Any]]:
    """Every fill in one process, a memory each, their timed chunks taken in turn (one chunk
    of every fill per round, after a warm-up round), so that the machine's drift reaches all
    fills alike. ``relative_to_empty`` (when fill 0 is among them) is the median over rounds
    of a fill's chunk time over fill 0's in the same round."""
    from longrange.models.memorizing.compat import MemorizingTransformer

    torch.manual_seed(0)
    model = MemorizingTransformer(**SIZE).train()
    tokens = corpus_tokens(max(fills) + (repeats + 3) * CHUNK + 1)

    def step_with(memories):
        def step(piece):
            model.zero_grad(set_to_none=True)
            logits = model(piece[:, :-1], memories)
            F.cross_entropy(logits.flatten(0, 1), piece[:, 1:].flatten()).backward()

        return step

    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(model.knn_memories_context(batch_size=1)) for _ in fills]
        rows = [_fill_ours(model, memories, tokens, fill) for fill, memories in zip(fills, held)]
        steps = [step_with(memories) for memories in held]
        times = _chunk_times(steps, tokens, [fill + CHUNK for fill in fills], repeats)
    for row, t in zip(rows, times):
        row["chunk_s"] = statistics.median(t)
        if fills[0] == 0:
            row["relative_to_empty"] = statistics.median(a / b for a, b in zip(t, times[0]))
    return rows


def reference_point(fill: int, repeats: int) -> dict[str, Any]:
    import tempfile

    from memorizing_transformers_pytorch import MemorizingTransformer

    torch.manual_seed(0)
    model = MemorizingTransformer(**SIZE, knn_memories_directory=tempfile.mkdtemp()).train()
    tokens = corpus_tokens(fill + (repeats + 3) * CHUNK + 1)
    with model.knn_memories_context(batch_size=1) as memories:
        with torch.no_grad():
            for start in range(0, fill, CHUNK):
                model(tokens[:, start : start + CHUNK], knn_memories=memories)
        recall = _reference_recall(model, memories, tokens[:, fill : fill + CHUNK]) if fill else None

        def step(piece):
            model.zero_grad(set_to_none=True)
            logits = model(piece[:, :-1], knn_memories=memories)
            F.cross_entropy(logits.flatten(0, 1), piece[:, 1:].flatten()).backward()

        chunk_s = statistics.median(_chunk_times([step], tokens, [fill + CHUNK], repeats)[0])
    return {"fill": fill, "reference_chunk_s": chunk_s, "reference_recall_at_k": recall}


def _reference_recall(model, memories, chunk: torch.Tensor) -> float:
    """recall@k of the reference's own index (its first kNN memory, the one searched as ours
    is) for the next chunk's queries, against exact search over the entries its memory file
    holds. The reference's search returns the index's labels, read as slots of that file."""
    from longrange.memory.knn.exact import exact_search

    memory = memories[0]

    def next_chunk():
        with torch.no_grad():
            model(chunk, knn_memories=memories, add_knn_memory=False)

    queries = _first_queries(memory, "search", next_chunk).float()
    filled = int(min(memory.db_offsets[0], memory.max_memories))
    keys = torch.from_numpy(np.ascontiguousarray(memory.db[0, :filled, 0])).float()
    want, _ = exact_search(keys[None], np.array([filled]), queries[None], TOP_K)
    got = memory.knns[0].search(queries.numpy(), TOP_K, increment_hits=False, increment_age=False)
    return _hit_rate(got, want[0])


def _in_child(which: str, fills: list[int], repeats: int) -> list[dict[str, Any]]:
    """``ours_points`` (all fills in one child) or ``reference_point`` (one fill per child);
    a row with ``error`` for each fill when the child fails."""
    # Both sides keep their memory in files; flush what an earlier child left dirty, so that
    # its write-back does not run during this child's timed chunks.
    os.sync()
    out, reason = run_child("longrange.bench.knn", [which, ",".join(map(str, fills)), str(repeats)])
    if out is not None:
        got = json.loads(out)
        return got if isinstance(got, list) else [got]
    return [{"fill": fill, "error": f"{which}: {reason[:200]}"} for fill in fills]


def run_knn_suite(
    fills: list[int] | None = None,
    *,
    repeats: int = 3,
    compare_reference: bool = False,
    out_dir: str = "benchmarks/results",
) -> list[dict[str, Any]]:
    """Time and measure the recall at each fill (each point in a fresh process)."""
    from longrange.bench.reference import reference_available

    fills = sorted(set(fills or DEFAULT_FILLS))
    if any(f < 0 for f in fills) or repeats < 1:
        raise ValueError(f"fills must be >= 0 and repeats >= 1, got {fills} and {repeats}")
    # All of ours in one child, then the reference's, a child per fill (each row printed again
    # with it): the reference flushes its memory file on every add, and the write-back of its
    # 250,000-entry files outlasts its own process.
    rows = [{"family": "memorizing", **row} for row in _in_child("ours", fills, repeats)]
    for row in rows:
        print(format_knn_row(row), flush=True)
    if compare_reference and reference_available("memorizing"):
        for row in rows:
            ref = _in_child("reference", [row["fill"]], repeats)[0]
            row.update({k: v for k, v in ref.items() if k != "fill"})
            if "chunk_s" in row and "reference_chunk_s" in row:
                row["speedup"] = row["reference_chunk_s"] / row["chunk_s"]
            print(format_knn_row(row), flush=True)
    path = results_path(out_dir, "cpu", "knn")
    merge_results(path, environment("cpu"), rows, keys=("family", "fill"))
    print(f"written: {path}")
    return rows


def format_knn_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"fill {r['fill']:>7}: {r['error']}"
    parts = [f"fill {r['fill']:>7}: chunk {1000 * r['chunk_s']:.0f} ms"]
    if r.get("relative_to_empty"):
        parts.append(f"{r['relative_to_empty']:.2f}x empty")
    if r.get("recall_at_k") is not None:
        parts.append(f"recall@{r['k']} {r['recall_at_k']:.3f} ({r['index']})")
    if r.get("speedup"):
        parts.append(f"reference {1000 * r['reference_chunk_s']:.0f} ms ({r['speedup']:.2f}x)")
    if r.get("reference_recall_at_k") is not None:
        parts.append(f"reference recall@{r['k']} {r['reference_recall_at_k']:.3f}")
    return ", ".join(parts)


if __name__ == "__main__":
    # Worker for _in_child: ours FILLS REPEATS | reference FILL REPEATS
    fills_arg, repeats_arg = [int(f) for f in sys.argv[2].split(",")], int(sys.argv[3])
    if sys.argv[1] == "ours":
        print(json.dumps(ours_points(fills_arg, repeats_arg)))
    else:
        print(json.dumps(reference_point(fills_arg[0], repeats_arg)))
