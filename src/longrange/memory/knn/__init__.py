"""kNN memory of past (key, value) pairs for the Memorizing Transformer.

- :class:`KNNMemory` / :class:`KNNMemoryList`: the reference package's names, on a
  memory-mapped store with FIFO wrap-around, per-row clearing, save / load, a directory lock
  and cleanup that removes the files.
- Index backends behind :class:`KNNIndex`: ``exact`` (torch matmul + top-k) and ``faiss``
  (flat, HNSW or IVF); ``backend="auto"`` picks exact on GPU and faiss on CPU.
"""

from longrange.memory.knn.exact import ExactIndex
from longrange.memory.knn.factory import resolve_backend
from longrange.memory.knn.interface import BACKENDS, INDEX_KINDS, KNNIndex
from longrange.memory.knn.memory import DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY, KNNMemory
from longrange.memory.knn.memory_list import KNNMemoryList
from longrange.memory.knn.store import MemmapStore

__all__ = [
    "BACKENDS",
    "DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY",
    "INDEX_KINDS",
    "ExactIndex",
    "KNNIndex",
    "KNNMemory",
    "KNNMemoryList",
    "MemmapStore",
    "resolve_backend",
]
