"""``--compare-reference``: the reference packages timed beside longrange in the same run.

Each builder imports its package (a test/benchmark oracle, never a runtime dependency) and
returns a function mapping tokens [1, N] to logits at the benchmark size (dim 256, depth 4,
heads 4) with the options the issues name. A family whose package is missing is skipped.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIZE = {"num_tokens": 256, "dim": 256, "depth": 4, "heads": 4}


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _performer(n: int) -> nn.Module:
    from performer_pytorch import PerformerLM

    return PerformerLM(max_seq_len=n, causal=True, **SIZE)


def _routing(n: int) -> nn.Module:
    from routing_transformer import RoutingTransformerLM

    return RoutingTransformerLM(max_seq_len=n, causal=True, window_size=128, n_local_attn_heads=2, **SIZE)


def _sinkhorn(n: int) -> nn.Module:
    from sinkhorn_transformer import SinkhornTransformerLM

    return SinkhornTransformerLM(max_seq_len=n, causal=True, bucket_size=128, **SIZE)


def _block_recurrent(n: int) -> nn.Module:
    from block_recurrent_transformer_pytorch import BlockRecurrentTransformer

    return BlockRecurrentTransformer(max_seq_len=n, block_width=512, **SIZE)


class _ChunkedMemorizing(nn.Module):
    """Reads the sequence as training does: chunks of 512 through kNN memories that start empty
    and fill as it goes, a forward and a backward per chunk (as longrange's memorizing bench)."""

    chunk = 512

    def __init__(self) -> None:
        super().__init__()
        from memorizing_transformers_pytorch import MemorizingTransformer

        self.directory = tempfile.mkdtemp(prefix="longrange-bench-ref-")
        # the package's defaults (a 250,000-entry memory), as the longrange bench preset
        self.model = MemorizingTransformer(dim_head=64, knn_memories_directory=self.directory, **SIZE)

    def bench_step(self, tokens: Tensor) -> None:
        with self.model.knn_memories_context(batch_size=tokens.shape[0]) as memories:
            for start in range(0, tokens.shape[1] - 1, self.chunk):
                piece = tokens[:, start : start + self.chunk + 1]
                logits = self.model(piece[:, :-1], knn_memories=memories)
                F.cross_entropy(logits.flatten(0, 1), piece[:, 1:].flatten()).backward()

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "directory", ""), ignore_errors=True)


def _memorizing(n: int) -> nn.Module:
    return _ChunkedMemorizing()


def reference_step(model: nn.Module, tokens: Tensor) -> None:
    """One forward+backward of a reference model over tokens [B, N + 1]."""
    if hasattr(model, "bench_step"):
        model.bench_step(tokens)
        return
    logits = _first(model(tokens[:, :-1]))
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()


BUILDERS: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "performer": ("performer_pytorch", _performer),
    "routing": ("routing_transformer", _routing),
    "sinkhorn": ("sinkhorn_transformer", _sinkhorn),
    "block_recurrent": ("block_recurrent_transformer_pytorch", _block_recurrent),
    "memorizing": ("memorizing_transformers_pytorch", _memorizing),
}


def reference_available(family: str) -> bool:
    return family in BUILDERS and importlib.util.find_spec(BUILDERS[family][0]) is not None


def time_reference_point(family: str, length: int, *, repeats: int) -> dict[str, Any]:
    package, build = BUILDERS[family]
    torch.manual_seed(0)
    model = build(length).train()
    tokens = torch.randint(0, 256, (1, length + 1))

    def step():
        model.zero_grad(set_to_none=True)
        reference_step(model, tokens)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    fwd_bwd = times[len(times) // 2]
    return {
        "family": f"{family} (reference)",
        "package": package,
        "length": length,
        "batch_size": 1,
        "params": sum(p.numel() for p in model.parameters()),
        "fwd_bwd_s": fwd_bwd,
        "fwd_s": None,
        "tokens_per_s": length / fwd_bwd,
    }
