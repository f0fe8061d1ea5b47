"""``longrange bench context``: the evidence that each family uses what lies far back.

Parts (``--parts``, default all):

- ``position``: each family trained at 4096 bytes per row for one wall-clock budget, then bits
  per byte by position in the validation documents of at least 8 KB, each read in order
  (:mod:`longrange.bench.context_eval`);
- ``ablation``: each long-range mechanism against its own ablation over ``seeds``, same steps,
  seed and data order (:data:`~longrange.bench.context_variants.ABLATIONS`);
- ``recall``: pass key and associative recall at 256 to 16K tokens, trained at 256
  (:mod:`longrange.bench.context_recall`);
- ``compute``: at 4K and the same budget, validation bits per byte of each family beside
  vanilla's, with the curve against training time.

One budget, ``budget_s`` seconds of training per run (``recall_budget_s`` for the recall
part), is turned into a step count per family by timing its steps on this machine
(:func:`~longrange.bench.context_train.calibrate_steps`); every variant of a family trains that
many steps. The position and compute parts share their
runs (the first seed), and the first seed's "on" side of each ablation is the same run too.
Rows go to ``benchmarks/results/<device>/context.json`` with the device and time on each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from longrange.bench.context_eval import MIN_DOC_BYTES, eval_documents, position_eval
from longrange.bench.context_recall import (
    RECALL_DISTANCES,
    RECALL_EVAL_EXAMPLES,
    RECALL_TASKS,
    RECALL_TRAIN_DISTANCE,
    recall_point,
)
from longrange.bench.context_train import Schedule, calibrate_steps, lm_batches, make_run, train
from longrange.bench.context_variants import (
    ABLATIONS,
    LM_CONTEXT,
    LM_MODELS,
    RECALL_MODELS,
    Ablation,
    ModelSpec,
    check_families,
    lm_reach,
)
from longrange.bench.device import device_label, environment
from longrange.bench.results import merge_results, results_path
from longrange.data.corpus import Corpus, Document, load_corpus

PARTS = ("position", "ablation", "recall", "compute")
DEFAULT_BUDGET_S = 60.0
# Vanilla needs about 1200-1500 steps of batch 8 to learn associative recall at 256 tokens
# (measured on one thread: 900 steps gave 100% on one seed and 35% on another); 100 s on two
# quiet cores gives it about that many.
DEFAULT_RECALL_BUDGET_S = 100.0
DEFAULT_SEEDS = (0, 1)
ROW_KEYS = ("part", "family", "ablation", "side", "task", "seed", "parts")


@dataclass(frozen=True)
class ContextSetup:
    """What the suite trains and measures; the defaults are the published suite, tests pass
    tiny ones."""

    context: int = LM_CONTEXT
    lm_models: Mapping[str, ModelSpec] = field(default_factory=lambda: dict(LM_MODELS))
    ablations: tuple[Ablation, ...] = ABLATIONS
    recall_models: Mapping[str, ModelSpec] = field(default_factory=lambda: dict(RECALL_MODELS))
    lm_schedule: Schedule = field(default_factory=lambda: Schedule(batch_size=2, lr=3e-3))
    stride: int | None = None  # of the sliding-window evaluation; None: context // 2
    min_doc_bytes: int = MIN_DOC_BYTES
    curve_points: int = 4  # evaluations during a compute-part run
    curve_docs: int = 4  # documents of those evaluations (the first ones)
    recall_distances: tuple[int, ...] = RECALL_DISTANCES
    recall_train_distance: int = RECALL_TRAIN_DISTANCE
    recall_examples: int = RECALL_EVAL_EXAMPLES

    @property
    def eval_stride(self) -> int:
        return self.stride or self.context // 2


def check_options(parts, budget_s, seeds, steps, recall_budget_s=DEFAULT_RECALL_BUDGET_S) -> None:
    """Refuse bad suite options with the accepted values, before any work."""
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"--parts takes a comma-separated subset of {','.join(PARTS)}; got {list(parts)}")
    for flag, value in (("--budget", budget_s), ("--recall-budget", recall_budget_s)):
        # an infinite budget would calibrate first and then fail turning it into a step count
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{flag} must be a positive number of seconds (finite), got {value!r}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds takes comma-separated non-negative integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {list(seeds)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--steps must be a positive integer, got {steps!r}")


class LMRunner:
    """Trains and evaluates the language-model runs, each once: a run is keyed by (family,
    ablation or None, seed) and shared by every part that needs it."""

    def __init__(
        self,
        setup: ContextSetup,
        train_docs: list[Document],
        docs: list[Document],
        *,
        device: torch.device,
        budget_s: float,
        steps: int | None,
        log: Callable[[str], None],
    ) -> None:
        self.setup, self.train_docs, self.docs, self.device = setup, train_docs, docs, device
        self.budget_s, self.fixed_steps, self.log = budget_s, steps, log
        self.calibrated: dict[str, tuple[int, float | None]] = {}
        self.done: dict[tuple, dict[str, Any]] = {}

    def factory(self, spec: ModelSpec, seed: int):
        s = self.setup

        def make(steps: int):
            batches = lm_batches(
                spec, self.train_docs, seq_len=s.context, batch_size=s.lm_schedule.batch_size, seed=seed
            )
            return make_run(spec, batches, schedule=s.lm_schedule, steps=steps, seed=seed, device=self.device)

        return make

    def steps_for(self, family: str) -> tuple[int, float | None]:
        """The family's step count: the budget over its calibrated step time (one calibration
        per family, on its base model), or the fixed ``--steps``."""
        if family not in self.calibrated:
            if self.fixed_steps is not None:
                self.calibrated[family] = (self.fixed_steps, None)
            else:
                spec = self.setup.lm_models[family]
                steps, step_s = calibrate_steps(self.factory(spec, 0), self.budget_s)
                self.log(f"{family}: {step_s:.3f} s per step -> {steps} steps in {self.budget_s:g} s")
                self.calibrated[family] = (steps, step_s)
        return self.calibrated[family]

    def result(
        self, family: str, ablation: Ablation | None, seed: int, *, curve: bool = False
    ) -> dict[str, Any]:
        """The run's summary; a run that fails (out of memory, a loss that is not finite, a
        setting the model refuses) gives a row with its error, and the suite goes on."""
        key = (family, ablation.name if ablation else None, seed)
        if key not in self.done:
            try:
                self.done[key] = self._train_and_evaluate(family, ablation, seed, curve)
            except (RuntimeError, ValueError) as err:
                self.log(f"  {family} seed {seed}: failed: {err}")
                self.done[key] = {"family": family, "seed": seed, "error": str(err)[:300]}
        return self.done[key]

    def _train_and_evaluate(
        self, family: str, ablation: Ablation | None, seed: int, curve: bool
    ) -> dict[str, Any]:
        s = self.setup
        base = s.lm_models[family]
        spec = ablation.specs(base)[1] if ablation else base
        steps, step_s = self.steps_for(family)
        name = f"{family}" + (f" [{ablation.name} off]" if ablation else "") + f" seed {seed}"
        self.log(f"training {name}: {steps} steps")
        reach = lm_reach(spec, s.context)
        evaluate = None
        if curve:
            quick = self.docs[: s.curve_docs]

            def evaluate(model):
                return self.evaluate(model, spec, quick, reach)["bpb"]

        run = self.factory(spec, seed)(steps)
        try:
            trained = train(
                run,
                eval_every=max(1, steps // s.curve_points) if curve else None,
                evaluate=evaluate,
                log=self.log,
            )
            evaluation = self.evaluate(run.model, spec, self.docs, reach)
        finally:
            run.close()
        self.log(f"  {name}: val bpb {evaluation['bpb']:.4f} ({trained['train_s']:.0f} s training)")
        result = {
            "family": family,
            "seed": seed,
            "config": spec.config_dict(),
            "call_len": spec.call_len,
            "context": s.context,
            "batch_size": s.lm_schedule.batch_size,
            "lr": s.lm_schedule.lr,
            "budget_s": None if self.fixed_steps is not None else self.budget_s,
            "steps": steps,
            "calibrated_step_s": step_s,
            "train_s": trained["train_s"],
            "final_train_loss": trained["final_loss"],
            "reach": reach,
            "stateful": spec.carries_state(),
            "eval_stride": None if spec.carries_state() else s.eval_stride,
            "train_curve": trained["curve"],
            "curve_documents": len(self.docs[: s.curve_docs]) if curve else None,
            **evaluation,
        }
        return result

    def evaluate(self, model, spec: ModelSpec, docs: list[Document], reach: int | None) -> dict[str, Any]:
        s = self.setup
        return position_eval(
            model,
            docs,
            stateful=spec.carries_state(),
            window=s.context,
            stride=s.eval_stride,
            call_len=spec.call_len,
            device=self.device,
            reach=reach,
        )


def _lm_rows(runner: LMRunner, families: list[str], parts: tuple[str, ...], seeds) -> list[dict[str, Any]]:
    rows = []
    if "position" in parts or "compute" in parts:
        for family in families:
            result = runner.result(family, None, seeds[0], curve="compute" in parts)
            if "position" in parts:
                drop = ("train_curve", "curve_documents")
                rows.append({"part": "position", **{k: v for k, v in result.items() if k not in drop}})
            if "compute" in parts:
                drop = ("buckets", "position_curve")
                rows.append({"part": "compute", **{k: v for k, v in result.items() if k not in drop}})
    if "ablation" in parts:
        for ab in runner.setup.ablations:
            if ab.family not in families:
                continue
            for seed in seeds:
                for side in ("on", "off"):
                    result = runner.result(ab.family, ab if side == "off" else None, seed)
                    drop = ("buckets", "position_curve", "train_curve", "curve_documents")
                    row = {k: v for k, v in result.items() if k not in drop}
                    row.update(
                        part="ablation",
                        ablation=ab.name,
                        side=side,
                        mechanism=ab.mechanism,
                        label=ab.on if side == "on" else ab.off,
                        setting=dict(ab.setting),
                    )
                    rows.append(row)
    return rows


def run_context_suite(
    families: list[str],
    *,
    device: str | torch.device,
    parts: tuple[str, ...] = PARTS,
    budget_s: float = DEFAULT_BUDGET_S,
    recall_budget_s: float = DEFAULT_RECALL_BUDGET_S,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
    steps: int | None = None,
    out_dir: str = "benchmarks/results",
    setup: ContextSetup | None = None,
    corpus: Corpus | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the chosen parts for ``families``, merge the rows into the suite's JSON, draw the
    plots and return the rows. ``budget_s`` is each language-model run's training time,
    ``recall_budget_s`` each recall run's; ``steps`` fixes every run's step count instead."""
    parts, seeds = tuple(parts), tuple(seeds)
    check_options(parts, budget_s, seeds, steps, recall_budget_s)
    setup = setup or ContextSetup()
    lm_parts = [p for p in parts if p != "recall"]
    if lm_parts:
        check_families(families, setup.lm_models, ",".join(lm_parts))
    if "recall" in parts:
        check_families(families, setup.recall_models, "recall")
    device = torch.device(device)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if lm_parts:
        corpus = corpus if corpus is not None else load_corpus()
        docs = eval_documents(corpus.val, min_bytes=setup.min_doc_bytes)
        log(f"evaluation: {len(docs)} validation documents of >= {setup.min_doc_bytes} bytes")
        runner = LMRunner(setup, corpus.train, docs, device=device, budget_s=budget_s, steps=steps, log=log)
        rows += _lm_rows(runner, families, parts, seeds)
    if "recall" in parts:
        for family in families:
            for task in RECALL_TASKS:
                log(f"recall: {family} {task}")
                try:
                    row = recall_point(
                        family,
                        setup.recall_models[family],
                        task,
                        budget_s=recall_budget_s,
                        seed=seeds[0],
                        device=device,
                        steps=steps,
                        distances=setup.recall_distances,
                        train_distance=setup.recall_train_distance,
                        examples=setup.recall_examples,
                        log=log,
                    )
                except (RuntimeError, ValueError) as err:
                    log(f"  {family} {task}: failed: {err}")
                    row = {"part": "recall", "family": family, "task": task, "seed": seeds[0]}
                    row["error"] = str(err)[:300]
                if steps is not None:
                    row["budget_s"] = None
                rows.append(row)
    rows.append(
        {
            "part": "run",
            "parts": ",".join(parts),
            "families": list(families),
            "seeds": list(seeds),
            "budget_s": None if steps is not None else budget_s,
            "recall_budget_s": None if steps is not None else recall_budget_s,
            "steps": steps,
            "threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - started,
        }
    )
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for row in rows:
        row.setdefault("device", device_label(device))
        row.setdefault("measured_at", stamp)
    path = results_path(out_dir, device, "context")
    merge_results(path, environment(device), rows, keys=ROW_KEYS)
    from longrange.bench.context_report import draw_context_plots, format_context_tables, load_context

    data = load_context(path.parent)
    draw_context_plots(data, path.parent)
    log(format_context_tables(data))
    log(f"written: {path} ({rows[-1]['wall_s']:.0f} s)")
    return rows
