"""The training loop: AdamW, warm-up + cosine decay, clipping, accumulation, mixed precision,
validation bits per byte, atomic checkpoints, exact resume, and what happens on faults.

A run folder ``<out>/<name>/`` holds config.json + model.safetensors (the latest checkpoint's
weights: a model directory ``from_pretrained`` reads), best/ (the best validation weights),
checkpoints/ (the latest checkpoint, one atomic unit: :mod:`longrange.train.checkpoint`),
train_config.json, metrics.jsonl, loss.png and sample.txt.

Faults:
- everything is checked before the run folder is made (options, model config, data, a
  validation split with tokens, a finite first validation), so a refused run leaves nothing;
- the folder is locked while a process trains in it (:mod:`longrange.train.run_folder`);
- a step whose loss or gradients are not finite is skipped (no optimizer update), counted in
  metrics.jsonl (``skipped_steps``), and ``max_nonfinite_steps`` of them in a row stop the run
  with :class:`TrainingDiverged`; weights or optimizer moments that are not finite are never
  written to a checkpoint;
- SIGINT / SIGTERM save a checkpoint between steps and stop
  (:mod:`longrange.train.interrupts`); kNN memory folders of dead processes are removed when
  a run starts (:mod:`longrange.train.leftovers`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.atomic import atomic_write_bytes, atomic_write_json, read_json
from longrange.data.corpus import Corpus, load_corpus
from longrange.data.samplers import IGNORE_INDEX, DocumentChunks, RandomWindows
from longrange.data.tokenizer import ByteTokenizer
from longrange.models.base import LongRangeLM
from longrange.models.registry import create_model, get_family
from longrange.ops.numerics import flushed_denormals
from longrange.train import distributed as dist_util
from longrange.train.checkpoint import CHECKPOINTS, POINTER, Checkpoint, remove_unpublished
from longrange.train.config import TrainConfig
from longrange.train.evaluate import autocast_context, close_state, evaluate_bpb
from longrange.train.interrupts import StopRequests, TrainingInterrupted
from longrange.train.leftovers import knn_parents, remove_stale_knn_folders
from longrange.train.optim import lr_at, make_optimizer, resolve_precision
from longrange.train.report import append_metrics, plot_loss, read_metrics, summary_text, truncate_metrics
from longrange.train.resume import (
    TrainingDiverged,
    check_resume,
    load_run_config,
    restore_trainer,
    save_trainer,
)
from longrange.train.run_folder import RunLock, check_out_folder, create_run_dir, next_free_run_dir

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "load_run_config", "lr_at", "make_optimizer"]


class LossStep(nn.Module):
    """Wraps a model so DDP/FSDP see one forward that returns the loss."""

    def __init__(self, model: LongRangeLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, targets: Tensor, state: Any = None) -> tuple[Tensor, Tensor, Any]:
        out = self.model.forward_lm(inputs, state=state)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        aux = out.aux_loss if out.aux_loss is not None else loss.new_zeros(())
        return loss, aux, out.state


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, corpus: Corpus | None = None) -> None:
        if not resume and cfg.data not in (None, "builtin"):
            # The run records where its data is, so that a resume from another folder reads it.
            cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
        self.cfg = cfg
        self.dist = dist_util.init_distributed(dist_util.pick_device(cfg.device))
        self.device = dist_util.pick_device(cfg.device, self.dist)
        self.precision = resolve_precision(cfg, self.device)
        self.log = print if self.dist.is_main else (lambda *a, **k: None)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.checkpoint: Checkpoint | None = None
        if resume:
            self.run_dir = Path(resume)
            self.checkpoint, self.resume_changed = check_resume(
                self.run_dir, cfg, world_size=self.dist.world_size
            )
            self.model = LongRangeLM.from_pretrained(self.checkpoint.folder)
        else:
            get_family(cfg.model)  # a clear error for an unknown family before anything else
            check_out_folder(cfg.out)
            self.model = create_model(cfg.model, cfg.preset, **cfg.set)
            self.run_dir = next_free_run_dir(cfg.out, cfg.name or f"{cfg.model}-{cfg.preset or 'default'}")
        self.corpus = corpus if corpus is not None else load_corpus(cfg.data)
        self._check_data()
        self.model.to(self.device)
        self.seq_len = cfg.seq_len or self.model.config.max_seq_len
        if self.seq_len > self.model.config.max_seq_len and not self.model.carries_state:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds the model's max_seq_len {self.model.config.max_seq_len}"
            )
        self.step_module = dist_util.wrap_model(LossStep(self.model), self.device, self.dist, fsdp=cfg.fsdp)
        if cfg.compile:
            self.step_module = torch.compile(self.step_module)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        sampler_cls = DocumentChunks if self.model.carries_state else RandomWindows
        source = self.corpus.train if self.model.carries_state else self.corpus.train_stream()
        self.sampler = sampler_cls(
            source, seq_len=self.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, rank=self.dist.rank
        )
        self.state = self.model.init_state(cfg.batch_size, self.device) if self.model.carries_state else None
        self.step, self.best_bpb, self.first_bpb = 0, math.inf, None
        self.skipped_steps, self.nonfinite_streak = 0, 0
        self.saved_step: int | None = None
        self.lock: RunLock | None = None
        self.opened = False
        self.stop = StopRequests()
        if self.checkpoint is not None:
            restore_trainer(self, self.checkpoint)

    def warn(self, text: str) -> None:
        if self.dist.is_main:
            print(text, file=sys.stderr)

    # --- checks before any work -----------------------------------------------------------
    def _check_data(self) -> None:
        vocab = self.model.config.vocab_size
        if vocab < ByteTokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {vocab} is too small for byte data (token ids 0-255); use vocab_size >= 256"
            )
        problem = self.corpus.validation_problem()
        if problem is not None:
            raise ValueError(f"no validation tokens: {problem}")

    # --- the run folder and its checkpoints -----------------------------------------------
    def save(self) -> Path | None:
        """Write the checkpoint of the current step (one atomic unit); rank 0 gets its folder."""
        return save_trainer(self)

    def _open_run_folder(self) -> None:
        cfg, metrics = self.cfg, self.run_dir / "metrics.jsonl"
        if self.dist.is_main:
            if self.checkpoint is None:
                self.run_dir = create_run_dir(cfg.out, self.run_dir.name)
                metrics = self.run_dir / "metrics.jsonl"
            self.lock = RunLock(self.run_dir)
            self.lock.acquire()
            if self.checkpoint is not None:
                pointer = read_json(self.run_dir / CHECKPOINTS / POINTER, "checkpoint pointer")
                if pointer.get("step") != self.checkpoint.step:
                    raise ValueError(
                        f"{self.run_dir} moved on to step {pointer.get('step')} while this process was "
                        "starting; resume again"
                    )
                remove_unpublished(self.run_dir, keep=self.checkpoint.folder.name)
                truncate_metrics(metrics, self.step)
            removed = remove_stale_knn_folders(knn_parents(self.model.config))
            if removed:
                self.log(f"removed {len(removed)} kNN memory folder(s) left by processes that ended")
            atomic_write_json(self.run_dir / "train_config.json", cfg.to_dict())
            if self.checkpoint is None:
                append_metrics(metrics, {"step": 0, "val_bpb": self.first_bpb})
        self.run_dir = Path(dist_util.broadcast_object(str(self.run_dir), self.dist))
        self.opened = True

    # --- the loop -------------------------------------------------------------------------
    def evaluate(self) -> float:
        return evaluate_bpb(
            self.model,
            self.corpus.val,
            seq_len=self.seq_len,
            max_tokens=self.cfg.eval_tokens,
            device=self.device,
            precision=self.precision,
        )

    def _micro_batch(self, index: int) -> tuple[Tensor, Tensor]:
        if self.model.carries_state:
            chunk = self.sampler.next()
            rows = chunk.new_doc.to(self.device)
            self.state = self.model.reset_state_rows(self.state, rows)
            return chunk.inputs.to(self.device), chunk.targets.to(self.device)
        windows = self.sampler.batch(index).to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def train_step(self) -> tuple[float, bool, bool]:
        """One optimizer step; returns (loss, skipped, fault). A step whose loss or gradient
        norm is not finite on any process is skipped: no update, the step still counts.
        ``fault`` is False for fp16 overflows the loss scaler handles itself."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.model.train()
        total = 0.0
        for micro in range(cfg.accum):
            inputs, targets = self._micro_batch(self.step * cfg.accum + micro)
            if cfg.compile:
                self.model.before_compiled_step()
            with autocast_context(self.device, self.precision):
                loss, aux, state = self.step_module(inputs, targets, self.state)
            if self.model.carries_state:
                self.state = self.model.detach_state(state)
            scaled = (loss + aux) / cfg.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() / cfg.accum
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # max_norm inf measures without clipping (the gradients are multiplied by exactly 1).
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf))
        loss_bad = dist_util.all_reduce_max(float(not math.isfinite(total)), self.dist) > 0
        grad_bad = dist_util.all_reduce_max(float(not math.isfinite(norm)), self.dist) > 0
        if loss_bad or grad_bad:
            if self.scaler:
                self.scaler.update()  # lowers the loss scale after an overflow
            if loss_bad and self.model.carries_state:
                # The carried state took in the same non-finite values: start it afresh.
                everything = torch.ones(cfg.batch_size, dtype=torch.bool, device=self.device)
                self.state = self.model.reset_state_rows(self.state, everything)
        elif self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total, loss_bad or grad_bad, loss_bad or (grad_bad and self.scaler is None)

    def sample(self) -> str:
        tok = ByteTokenizer()
        prompt = tok.encode(self.cfg.prompt or "\n").to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        new = self.model.generate(prompt, self.cfg.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        return self.cfg.prompt + tok.decode(new)

    def _honour_stop(self) -> None:
        """Between steps: when a signal asked to stop, checkpoint (if the run folder exists
        and this step may be saved) and raise TrainingInterrupted."""
        signum = int(dist_util.all_reduce_max(float(self.stop.signum or 0), self.dist))
        if not signum:
            return
        if not self.opened:
            raise TrainingInterrupted(signum)
        checkpoint = save_trainer(self) if self._may_save() else None
        raise TrainingInterrupted(
            signum, step=self.step, checkpoint=checkpoint, run_dir=self.run_dir, saved_step=self.saved_step
        )

    def _diverged_text(self) -> str:
        if self.saved_step is None:
            advice = "there is no checkpoint yet: start again with a lower --lr or a longer --warmup"
        else:
            advice = (
                f"the last checkpoint (step {self.saved_step}) is untouched: resume from it with a lower "
                f"--lr (longrange train --resume {self.run_dir} --lr ...)"
            )
        return (
            f"training stopped at step {self.step}: the loss or the gradients were not finite for "
            f"{self.nonfinite_streak} steps in a row (max_nonfinite_steps); those steps did not change "
            f"the weights; {advice}"
        )

    def _may_save(self) -> bool:
        """Not twice for one step, and not during a run of non-finite steps: weights that
        just gave a non-finite loss are suspect, and the last checkpoint before them is kept."""
        return self.step != self.saved_step and self.nonfinite_streak == 0

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps``. ``stop_after`` ends the process's work early right after
        that step, as a kill would (tests use it to check resume). Raises TrainingInterrupted
        on SIGINT / SIGTERM (after saving a checkpoint) and TrainingDiverged on non-finite
        training, after releasing the carried state's files; the run folder's lock is released
        however fit ends. After a normal end ``self.state`` stays open for inspection (its
        files go when it is closed or collected)."""
        try:
            with self.stop, flushed_denormals(self.device, self.cfg.flush_denormals):
                return self._fit(stop_after)
        except BaseException:
            close_state(self.state)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        cfg = self.cfg
        if self.first_bpb is None and self.dist.is_main:
            self.first_bpb = self.evaluate()  # before the run folder: a broken model leaves nothing
            if not math.isfinite(self.first_bpb):
                raise TrainingDiverged(
                    f"the validation loss before training is {self.first_bpb}: the model's outputs are not "
                    "finite (check the --set values)"
                )
        self._honour_stop()
        self._open_run_folder()
        metrics_path = self.run_dir / "metrics.jsonl"
        self.log(f"run folder: {self.run_dir}")
        if self.checkpoint is not None:
            changed = f" (changed: {', '.join(self.resume_changed)})" if self.resume_changed else ""
            self.log(f"resuming from {self.checkpoint.folder}, step {self.step}{changed}")
        self.log(f"data: {self.corpus.summary()}")
        self.log(
            f"model: {cfg.model} ({self.model.num_params() / 1e6:.2f} M parameters), seq_len {self.seq_len}, "
            f"batch {cfg.batch_size} x {cfg.accum}, device {self.device}, precision {self.precision}"
        )
        if self.checkpoint is None and self.dist.is_main:
            self.log(f"validation bpb before training: {self.first_bpb:.3f}")
        dist_util.barrier(self.dist)
        tokens_per_step = cfg.batch_size * cfg.accum * self.seq_len * self.dist.world_size
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
        last_bpb, tok_s = None, 0.0
        try:
            while self.step < cfg.steps:
                loss, skipped, fault = self.train_step()
                loss = dist_util.all_reduce_mean(loss, self.dist)
                window_steps += 1
                if bar:
                    bar.update(1)
                record: dict[str, Any] = {}
                if skipped:
                    self.skipped_steps += 1
                    self.nonfinite_streak += int(fault)
                    record = {"step": self.step, "skipped": True, "skipped_steps": self.skipped_steps}
                    what = (
                        f"the loss is {loss}" if not math.isfinite(loss) else "the gradients are not finite"
                    )
                    self.warn(f"step {self.step}: {what}; the step was skipped (no update)")
                else:
                    self.nonfinite_streak = 0
                last = self.step == cfg.steps
                evaluating = self.step % cfg.eval_every == 0 or last
                # A validation step is logged whatever log_every is: the two intervals need not
                # divide each other (the CLI sets --eval-every but not log_every).
                if self.step % cfg.log_every == 0 or evaluating:
                    elapsed = time.perf_counter() - window_start
                    tok_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    window_start, window_steps = time.perf_counter(), 0
                    record.update(
                        step=self.step,
                        train_loss=loss if math.isfinite(loss) else None,
                        lr=lr_at(self.step - 1, cfg),
                        tokens_per_s=tok_s,
                        skipped_steps=self.skipped_steps,
                    )
                    if evaluating:
                        if self.dist.is_main:
                            last_bpb = self.evaluate()
                            record["val_bpb"] = last_bpb
                            if last_bpb < self.best_bpb:
                                self.best_bpb = last_bpb
                                self.model.save_pretrained(self.run_dir / "best")
                        dist_util.barrier(self.dist)
                    if bar:
                        bar.set_postfix(
                            loss=f"{loss:.3f}",
                            tok_s=f"{tok_s:,.0f}",
                            bpb="-" if last_bpb is None else f"{last_bpb:.3f}",
                        )
                if record and self.dist.is_main:
                    append_metrics(metrics_path, record)
                if self.nonfinite_streak >= cfg.max_nonfinite_steps:
                    raise TrainingDiverged(self._diverged_text())
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    if self._may_save():
                        save_trainer(self)
                    else:
                        self.warn(f"step {self.step}: no checkpoint during non-finite steps")
                if stop_after is not None and self.step >= stop_after:
                    return {"run_dir": str(self.run_dir), "steps": self.step, "stopped": True}
                self._honour_stop()
        finally:
            if bar:
                bar.close()
        self._honour_stop()
        return self._finish(last_bpb, tok_s, time.perf_counter() - started)

    def _finish(self, last_bpb: float | None, tok_s: float, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        result: dict[str, Any] = {"run_dir": str(self.run_dir), "steps": self.step}
        if self.dist.is_main:
            if last_bpb is None:
                last_bpb = self.evaluate()
            # A model whose outputs are not finite cannot be sampled from.
            sample = (
                self.sample() if math.isfinite(last_bpb) else cfg.prompt + " [no sample: outputs not finite]"
            )
            atomic_write_bytes(self.run_dir / "sample.txt", sample.encode("utf-8"))
            metrics = read_metrics(self.run_dir / "metrics.jsonl")
            plot_loss(metrics, self.run_dir / "loss.png", f"{cfg.model} ({cfg.preset})")
            result.update(
                val_bpb_before=self.first_bpb,
                val_bpb_after=last_bpb,
                best_bpb=self.best_bpb,
                skipped_steps=self.skipped_steps,
                sample=sample,
            )
            info = {
                "run folder": self.run_dir,
                "model": f"{cfg.model} / {cfg.preset} ({self.model.num_params() / 1e6:.2f} M params)",
                "steps": self.step,
                "skipped steps": self.skipped_steps,
                "val bpb before": f"{self.first_bpb:.3f}" if self.first_bpb is not None else "-",
                "val bpb after": f"{last_bpb:.3f}",
                "tokens/s (last)": f"{tok_s:,.0f}",
                "wall time": f"{wall:.0f} s",
            }
            self.log(summary_text(info, sample))
        dist_util.barrier(self.dist)
        dist_util.shutdown(self.dist)
        return result
