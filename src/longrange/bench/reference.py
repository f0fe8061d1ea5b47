"""``--compare-reference``: the reference packages timed beside longrange in the same run.

Every family is compared at the reference package's defaults: one table (:data:`CLASSES`)
names the reference-named class and the few keywords the issues fix (all others at their
defaults, at the benchmark size dim 256, depth 4, heads 4), and :func:`build` makes that model
from the reference package (``source="reference"``, a test and benchmark oracle, never a
runtime dependency) or from longrange's class of the same name and keywords
(``source="longrange"``). The Performer reference cannot run 8K causal tokens, so
``source="exact"`` also builds longrange's ``PerformerLM`` with every FAVOR+ attention swapped
for exact causal softmax attention (the fused SDPA kernel): the same model, exact attention.
PerformerLM, RoutingTransformerLM and SinkhornTransformerLM are non-causal by their packages'
defaults, so each also has a "family/noncausal" setting with every keyword at the package's
default, paired with its package.

The memorizing models are measured as they train: chunks of 512 tokens, a forward and a
backward per chunk, through kNN memories that start empty (``fill=None``), or per chunk once
``fill`` tokens have filled the memories (the reference-defaults comparison: 32K).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import shutil
import statistics
import tempfile
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.bench.timing import steps_in_turn

SIZE = {"num_tokens": 256, "dim": 256, "depth": 4, "heads": 4}
SOURCES = ("reference", "longrange", "exact")
MEMORY_FILL = 32768
# rounds of the per-chunk memorizing pair at least: a chunk is a tenth of a second, and the
# reference's chunk time drifts 155-232 ms between runs (2 rounds read 2.35x, 10 and 16 read
# 1.80-1.81x)
CHUNK_ROUNDS = 10

# family -> (reference package, class name, keywords beyond SIZE, the setting in words)
CLASSES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "performer": ("performer_pytorch", "PerformerLM", {"causal": True}, "causal, 266 features"),
    "routing": (
        "routing_transformer",
        "RoutingTransformerLM",
        {"causal": True, "window_size": 128, "n_local_attn_heads": 2},
        "causal, 2 local heads, window 128",
    ),
    "sinkhorn": (
        "sinkhorn_transformer",
        "SinkhornTransformerLM",
        {"causal": True, "bucket_size": 128},
        "causal, bucket 128",
    ),
    "block_recurrent": (
        "block_recurrent_transformer_pytorch",
        "BlockRecurrentTransformer",
        {"block_width": 512},
        "block 512, 512 states",
    ),
    "memorizing": (
        "memorizing_transformers_pytorch",
        "MemorizingTransformer",
        {"dim_head": 64},
        "chunks of 512",
    ),
}
# These three classes are non-causal by their packages' defaults: each is also paired with
# every keyword at the package's default (at the benchmark size), the model a user gets by
# calling the class, against the package (the Performer's too: it runs non-causal 8K).
# A variant is named "family/noncausal" wherever a family name goes.
PACKAGE_DEFAULTS = {
    "performer": "package defaults: non-causal, 266 features",
    "routing": "package defaults: non-causal, window 64, routed heads only",
    "sinkhorn": "package defaults: non-causal, bucket 64",
}
for _family, _setting in PACKAGE_DEFAULTS.items():
    CLASSES[f"{_family}/noncausal"] = (*CLASSES[_family][:2], {}, _setting)
BUILDERS = CLASSES  # the families with a reference package


def variants(family: str) -> list[str]:
    """The other settings of ``family`` compared at its package's defaults ("performer" ->
    ["performer/noncausal"])."""
    return [name for name in CLASSES if name.startswith(f"{family}/")]


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class ExactAttention(nn.Module):
    """Stands in for a causal ``FastAttention``: exact softmax attention of q, k, v [B, H, N, D]
    on the fused SDPA kernel; ``mask`` [B, N] key padding."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        from longrange.ops.dense import dense_attention

        return dense_attention(q, k, v, causal=True, mask=None if mask is None else mask[:, None, None, :])


class _ChunkedMemorizing(nn.Module):
    """Reads the sequence as training does: chunks of 512 through kNN memories, a forward and a
    backward per chunk. ``fill`` None: the memories start empty for every step and fill as it
    goes (as longrange's memorizing bench); ``fill`` N: N tokens fill the memories once (no
    gradients), then each step is one chunk on top of them."""

    chunk = 512

    def __init__(self, cls: type, fill: int | None, **keywords: Any) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="longrange-bench-ref-")
        # a finalizer, not __del__: at interpreter exit __del__ may run after this module's
        # globals (shutil) are gone, and it printed a traceback instead of cleaning up
        self._contexts: list = []
        weakref.finalize(self, _close, self._contexts, self.directory)
        self.model = cls(knn_memories_directory=self.directory, **SIZE, **keywords)
        self.fill = fill
        self._memories = None

    def _step(self, piece: Tensor, memories) -> None:
        logits = _first(self.model(piece[:, :-1], knn_memories=memories))
        F.cross_entropy(logits.flatten(0, 1), piece[:, 1:].flatten()).backward()

    def bench_step(self, tokens: Tensor) -> None:
        if self.fill is None:
            with self.model.knn_memories_context(batch_size=tokens.shape[0]) as memories:
                for start in range(0, tokens.shape[1] - 1, self.chunk):
                    self._step(tokens[:, start : start + self.chunk + 1], memories)
            return
        if self._memories is None:
            context = self.model.knn_memories_context(batch_size=tokens.shape[0])
            self._memories = context.__enter__()
            self._contexts.append(context)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for _ in range(0, self.fill, self.chunk):
                    filler = torch.randint(
                        0, SIZE["num_tokens"], (tokens.shape[0], self.chunk), generator=gen
                    )
                    self.model(filler, knn_memories=self._memories)
        self._step(tokens[:, : self.chunk + 1], self._memories)


def _close(contexts: list, directory: str) -> None:
    """Close a :class:`_ChunkedMemorizing`'s memories and remove their folder."""
    for context in contexts:
        context.__exit__(None, None, None)
    shutil.rmtree(directory, ignore_errors=True)


def build(family: str, length: int, source: str = "reference", *, fill: int | None = None) -> nn.Module:
    """The model of :data:`CLASSES` for ``family`` at ``length`` tokens from ``source``."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "exact" and family != "performer":
        raise ValueError("source='exact' is the causal Performer's comparison only")
    package, name, keywords, _ = CLASSES[family]
    module = importlib.import_module(package if source == "reference" else "longrange")
    cls = getattr(module, name)
    if family == "memorizing":  # the package's defaults: a 250,000-entry memory, as the bench preset
        return _ChunkedMemorizing(cls, fill, **keywords)
    model = cls(max_seq_len=length, **SIZE, **keywords)
    if source == "exact":
        for layer in model.modules():
            if hasattr(layer, "fast_attention"):
                layer.fast_attention = ExactAttention()
    return model


def reference_step(model: nn.Module, tokens: Tensor) -> None:
    """One forward+backward of a model from :func:`build` over tokens [B, N + 1]."""
    if hasattr(model, "bench_step"):
        model.bench_step(tokens)
        return
    logits = _first(model(tokens[:, :-1]))
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()


def reference_available(family: str) -> bool:
    return family in CLASSES and importlib.util.find_spec(CLASSES[family][0]) is not None


def row_name(family: str, source: str) -> str:
    """How a row of each source is labelled in speed.json."""
    return {"reference": f"{family} (reference)", "longrange": f"{family} (reference defaults)"}.get(
        source, f"{family} (exact SDPA)"
    )


def time_reference_point(
    family: str, length: int, *, repeats: int, source: str = "reference", fill: int | None = None
) -> dict[str, Any]:
    """Median forward+backward time of :func:`build`'s model after one warm-up step."""
    return time_in_turn(family, length, repeats=repeats, sources=(source,), fill=fill)[0]


def time_in_turn(
    family: str, length: int, *, repeats: int, sources: tuple[str, ...], fill: int | None = None
) -> list[dict[str, Any]]:
    """:func:`time_reference_point` for each of ``sources`` in one process: a warm-up step of
    each, then ``repeats`` rounds that time one step of each in turn, so that the machine's
    drift reaches them alike. Every row after the first also carries ``paired_speedup``: the
    median over rounds of its step time over the first source's in the same round."""
    torch.manual_seed(0)
    models = [build(family, length, source, fill=fill).train() for source in sources]
    tokens = torch.randint(0, 256, (1, length + 1))

    def step(model):
        model.zero_grad(set_to_none=True)
        reference_step(model, tokens)

    times = steps_in_turn([functools.partial(step, model) for model in models], repeats)
    timed = _ChunkedMemorizing.chunk if fill is not None else length
    rows = []
    for source, model, spent in zip(sources, models, times):
        fwd_bwd = statistics.median(spent)  # of an even count: the mean of the middle two
        row = {
            "family": row_name(family, source),
            "package": CLASSES[family][0] if source == "reference" else "longrange",
            "length": length,
            "batch_size": 1,
            "params": sum(p.numel() for p in model.parameters()),
            "fwd_bwd_s": fwd_bwd,
            "fwd_s": None,
            "tokens_per_s": timed / fwd_bwd,
        }
        if fill is not None:
            row["filled"] = fill
        if rows:
            row["paired_speedup"] = statistics.median(a / b for a, b in zip(spent, times[0]))
        rows.append(row)
    return rows


def compare_at_defaults(
    family: str,
    lengths: list[int],
    reference_rows: list[dict[str, Any]],
    *,
    repeats: int,
    timer,
    timer_in_turn=None,
) -> list[dict[str, Any]]:
    """The reference-defaults pairs of ``family``: at every length, longrange's class against
    the reference package and, for the Performer, against the same model with exact SDPA
    attention; memorizing once, per chunk after :data:`MEMORY_FILL` tokens filled both
    models' memories, over at least :data:`CHUNK_ROUNDS` rounds.

    ``timer_in_turn(family, length, repeats, sources, fill)``, when given, times longrange's
    model and its comparison in one process, step for step in turn (:func:`time_in_turn`),
    and the pair's speed-up is the median of the rounds' ratios: against the reference package
    for every family but the Performer (whose reference cannot run 8K; its row comes from
    ``reference_rows``), against the exact twin for the Performer. Where that child fails (a
    reference that outgrows the machine), ``timer(family, length, repeats, source, fill)``
    times each model in a process of its own, and the reference's row is ``reference_rows``'."""
    _, name, _, setting = CLASSES[family]
    twin = "exact" if family == "performer" else "reference"

    def measure(
        length: int, fill: int | None = None, rounds: int = repeats
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if timer_in_turn is not None:
            ours, other = timer_in_turn(family, length, rounds, ("longrange", twin), fill)
            if "error" not in ours:
                return ours, other
        return timer(family, length, rounds, "longrange", fill), None

    if family == "memorizing":
        chunk, rounds = _ChunkedMemorizing.chunk, max(repeats, CHUNK_ROUNDS)
        ours, theirs = measure(chunk, MEMORY_FILL, rounds)
        theirs = theirs or timer(family, chunk, rounds, "reference", MEMORY_FILL)
        words = f"per {chunk}-token chunk, {MEMORY_FILL // 1024}K memories filled"
        return [_pair(family, name, words, ours, theirs, "reference package")]
    by_length = {r["length"]: r for r in reference_rows}
    pairs = []
    for length in lengths:
        ours, other = measure(length)
        if family == "performer":
            pairs.append(_pair(family, name, setting, ours, by_length.get(length), "reference package"))
            other = other or timer(family, length, repeats, "exact")
            pairs.append(_pair(family, name, setting, ours, other, "exact SDPA attention"))
        else:
            pairs.append(
                _pair(family, name, setting, ours, other or by_length.get(length), "reference package")
            )
    return pairs


def _pair(family, name, setting, ours, other, against) -> dict[str, Any]:
    row: dict[str, Any] = {
        "family": family,
        "class": name,
        "setting": setting,
        "length": ours["length"],
        "against": against,
        "longrange_s": ours.get("fwd_bwd_s"),
        "other_s": None if other is None else other.get("fwd_bwd_s"),
    }
    if "filled" in ours:
        row["filled"] = ours["filled"]
    for side, found in (("longrange", ours), ("other", other)):
        if found is not None and "error" in found:
            row[f"{side}_error"] = found["error"]
    if row["longrange_s"] and row["other_s"]:
        row["speedup"] = (other or {}).get("paired_speedup") or row["other_s"] / row["longrange_s"]
    return row


def _seconds(value: float | None, error: str | None) -> str:
    if value is not None:
        return f"{value * 1000:,.0f} ms"
    return "fails" if error else "-"


def format_pairs(pairs: list[dict[str, Any]]) -> str:
    """The reference-defaults pairs as a text table."""
    head = (
        f"{'class':<24}{'setting':<38}{'length':>8}  {'against':<22}{'longrange':>12}{'other':>12}"
        f"{'speed-up':>10}"
    )
    lines = [head, "-" * len(head)]
    for p in pairs:
        ours = _seconds(p.get("longrange_s"), p.get("longrange_error"))
        other = _seconds(p.get("other_s"), p.get("other_error"))
        ratio = f"{p['speedup']:.2f}x" if p.get("speedup") else "-"
        lines.append(
            f"{p['class']:<24}{p.get('setting', ''):<38}{p['length']:>8}  {p['against']:<22}{ours:>12}"
            f"{other:>12}{ratio:>10}"
        )
    return "\n".join(lines)


def reference_defaults_markdown(data: dict[str, Any]) -> str:
    """README table of ``reference_defaults.json``: each reference-named class at the
    reference's defaults against its comparison, measured in the same run."""
    out = [
        "| class (reference defaults) | tokens | against | longrange | other | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for p in data.get("results", []):
        length = p["length"]
        tokens = f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)
        ours = _seconds(p.get("longrange_s"), p.get("longrange_error"))
        other = _seconds(p.get("other_s"), p.get("other_error"))
        ratio = f"{p['speedup']:.2f}x" if p.get("speedup") else "-"
        out.append(
            f"| {p['class']} ({p['setting']}) | {tokens} | {p['against']} | {ours} | {other} | {ratio} |"
        )
    return "\n".join(out)
