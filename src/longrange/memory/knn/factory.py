"""The one place that picks and builds a kNN index backend (exact or faiss)."""

from __future__ import annotations

import torch
from torch import Tensor

from longrange.memory.knn.exact import ExactIndex
from longrange.memory.knn.interface import BACKENDS, INDEX_KINDS, KNNIndex
from longrange.memory.knn.store import MemmapStore


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``exact`` on a GPU (or without faiss), else ``faiss``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "exact" if device.type != "cpu" or not faiss_available() else "faiss"
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu); use 'exact'")
    return backend


def make_index(
    backend: str,
    store: MemmapStore,
    *,
    keys: Tensor,
    kind: str = "auto",
    device: torch.device,
    options: dict | None = None,
    threads: int = 1,
) -> KNNIndex:
    """Build the index for ``store``; ``keys`` is the [R, M, D] key table the exact search reads.

    ``kind="auto"`` is the exact search with the exact backend, and the size-adaptive index
    (exact while small, an inverted file beyond: our own, ``cells.py``, not faiss's) with the
    faiss backend, beside faiss's own kinds."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index must be one of {list(INDEX_KINDS)}, got {kind!r}")
    options = dict(options or {})
    if backend == "exact":
        if kind not in ("auto", "flat") or options:
            raise ValueError(
                f"the exact backend is a flat search; index={kind!r} / index options {sorted(options)} "
                "need backend='faiss'"
            )
        return ExactIndex(store, keys)
    # faiss loads only when a faiss index is asked for
    if kind == "auto":
        from longrange.memory.knn.adaptive import AdaptiveIndex

        return AdaptiveIndex(store, store.keys(), threads=threads, **options)
    from longrange.memory.knn.faiss_index import FaissIndex

    return FaissIndex(store, kind=kind, device=device, threads=threads, **options)
