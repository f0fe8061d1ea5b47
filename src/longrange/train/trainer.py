"""The training loop: AdamW, warm-up + cosine decay, clipping, accumulation, mixed precision,
validation bits per byte, atomic checkpoints and exact resume.

A run folder ``<out>/<name>/`` holds: config.json + model.safetensors (the latest weights, a
model directory ``from_pretrained`` reads), best/ (the best validation weights),
trainer_state.{json,safetensors} (optimizer, step, sampler position, RNG states),
train_config.json, metrics.jsonl, loss.png and sample.txt.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.data.corpus import Corpus, load_corpus
from longrange.data.samplers import IGNORE_INDEX, DocumentChunks, RandomWindows
from longrange.data.tokenizer import ByteTokenizer
from longrange.models.base import CONFIG_NAME, LongRangeLM
from longrange.models.registry import create_model, get_family
from longrange.train import distributed as dist_util
from longrange.train.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_trainer_state,
    read_json,
    restore_rng,
    save_trainer_state,
)
from longrange.train.config import TrainConfig
from longrange.train.evaluate import autocast_context, evaluate_bpb
from longrange.train.report import (
    append_metrics,
    plot_loss,
    read_metrics,
    summary_text,
    truncate_metrics,
)


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(param: Tensor) -> bool:
    """Weight decay goes to matrices and tables only: a tensor with two or more dimensions
    longer than 1. Biases, norm gains and per-head scalars kept in broadcast shape (the
    memorizing layers' temperature and memory gate, [H, 1, 1]) are left alone: decaying a
    log-temperature towards 0 pulls the attention temperature towards 1."""
    return sum(size > 1 for size in param.shape) >= 2


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decays(param) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def unique_run_dir(out: str, name: str) -> Path:
    base = Path(out) / name
    if not base.exists():
        return base
    i = 2
    while (Path(out) / f"{name}-{i}").exists():
        i += 1
    return Path(out) / f"{name}-{i}"


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, corpus: Corpus | None = None) -> None:
        self.cfg = cfg
        self.dist = dist_util.init_distributed(dist_util.pick_device(cfg.device))
        self.device = dist_util.pick_device(cfg.device, self.dist)
        self.precision = resolve_precision(cfg, self.device)
        self.log = print if self.dist.is_main else (lambda *a, **k: None)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.corpus = corpus if corpus is not None else load_corpus(cfg.data)
        if resume:
            self.run_dir = Path(resume)
            if not (self.run_dir / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"--resume {resume}: not a run folder (no {CONFIG_NAME})")
            self.model = LongRangeLM.from_pretrained(self.run_dir)
        else:
            get_family(cfg.model)  # a clear error for an unknown family before anything else
            self.model = create_model(cfg.model, cfg.preset, **cfg.set)
            name = cfg.name or f"{cfg.model}-{cfg.preset or 'default'}"
            self.run_dir = unique_run_dir(cfg.out, name)
        self.model.to(self.device)
        self.seq_len = cfg.seq_len or self.model.config.max_seq_len
        if self.seq_len > self.model.config.max_seq_len and not self.model.carries_state:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds the model's max_seq_len {self.model.config.max_seq_len}"
            )
        self.step_module = dist_util.wrap_model(LossStep(self.model), self.device, self.dist, fsdp=cfg.fsdp)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        sampler_cls = DocumentChunks if self.model.carries_state else RandomWindows
        source = self.corpus.train if self.model.carries_state else self.corpus.train_stream()
        self.sampler = sampler_cls(
            source,
            seq_len=self.seq_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=self.dist.rank,
        )
        self.state = self.model.init_state(cfg.batch_size, self.device) if self.model.carries_state else None
        self.step, self.best_bpb, self.first_bpb = 0, math.inf, None
        if resume:
            self._load_trainer_state()

    # --- checkpoints ----------------------------------------------------------------------
    def _load_trainer_state(self) -> None:
        opt_state, plain, tensors = load_trainer_state(self.run_dir)
        self.optimizer.load_state_dict(opt_state)
        self.step = int(plain["step"])
        self.best_bpb = float(plain.get("best_bpb", math.inf))
        self.first_bpb = plain.get("first_bpb")
        self.sampler.load_state(plain.get("sampler", {}))
        restore_rng(tensors, plain["rng"])
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    def save(self) -> None:
        if not self.dist.is_main:
            return
        self.model.save_pretrained(self.run_dir)
        extra = {
            "step": self.step,
            "best_bpb": self.best_bpb if math.isfinite(self.best_bpb) else None,
            "first_bpb": self.first_bpb,
            "sampler": self.sampler.state(),
        }
        save_trainer_state(self.run_dir, self.optimizer.state_dict(), extra)

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

    def train_step(self) -> float:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.model.train()
        total = 0.0
        for micro in range(cfg.accum):
            inputs, targets = self._micro_batch(self.step * cfg.accum + micro)
            with autocast_context(self.device, self.precision):
                loss, aux, state = self.step_module(inputs, targets, self.state)
            if self.model.carries_state:
                self.state = self.model.detach_state(state)
            scaled = (loss + aux) / cfg.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() / cfg.accum
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def sample(self) -> str:
        tok = ByteTokenizer()
        prompt = tok.encode(self.cfg.prompt or "\n").to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        new = self.model.generate(prompt, self.cfg.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        return self.cfg.prompt + tok.decode(new)

    def fit(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps``. ``stop_after`` ends the process's work early right after
        that step, as a kill would (tests use it to check resume)."""
        cfg, metrics_path = self.cfg, self.run_dir / "metrics.jsonl"
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "train_config.json", cfg.to_dict())
        self.log(f"run folder: {self.run_dir}")
        self.log(f"data: {self.corpus.summary()}")
        self.log(
            f"model: {cfg.model} ({self.model.num_params() / 1e6:.2f} M parameters), seq_len {self.seq_len}, "
            f"batch {cfg.batch_size} x {cfg.accum}, device {self.device}, precision {self.precision}"
        )
        if self.first_bpb is None and self.dist.is_main:
            self.first_bpb = self.evaluate()
            self.log(f"validation bpb before training: {self.first_bpb:.3f}")
            append_metrics(metrics_path, {"step": 0, "val_bpb": self.first_bpb})
        dist_util.barrier(self.dist)
        tokens_per_step = cfg.batch_size * cfg.accum * self.seq_len * self.dist.world_size
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
        last_bpb, tok_s = None, 0.0
        while self.step < cfg.steps:
            loss = dist_util.all_reduce_mean(self.train_step(), self.dist)
            window_steps += 1
            if bar:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                tok_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                record = {
                    "step": self.step,
                    "train_loss": loss,
                    "lr": lr_at(self.step - 1, cfg),
                    "tokens_per_s": tok_s,
                }
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    if self.dist.is_main:
                        last_bpb = self.evaluate()
                        record["val_bpb"] = last_bpb
                        if last_bpb < self.best_bpb:
                            self.best_bpb = last_bpb
                            self.model.save_pretrained(self.run_dir / "best")
                    dist_util.barrier(self.dist)
                if self.dist.is_main:
                    append_metrics(metrics_path, record)
                if bar:
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        tok_s=f"{tok_s:,.0f}",
                        bpb="-" if last_bpb is None else f"{last_bpb:.3f}",
                    )
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
                dist_util.barrier(self.dist)
            if stop_after is not None and self.step >= stop_after:
                if bar:
                    bar.close()
                return {"run_dir": str(self.run_dir), "steps": self.step, "stopped": True}
        if bar:
            bar.close()
        wall = time.perf_counter() - started
        result: dict[str, Any] = {"run_dir": str(self.run_dir), "steps": self.step}
        if self.dist.is_main:
            if last_bpb is None:
                last_bpb = self.evaluate()
            sample = self.sample()
            atomic_write_bytes(self.run_dir / "sample.txt", sample.encode("utf-8"))
            plot_loss(read_metrics(metrics_path), self.run_dir / "loss.png", f"{cfg.model} ({cfg.preset})")
            result.update(
                val_bpb_before=self.first_bpb,
                val_bpb_after=last_bpb,
                best_bpb=self.best_bpb,
                sample=sample,
            )
            info = {
                "run folder": self.run_dir,
                "model": f"{cfg.model} / {cfg.preset} ({self.model.num_params() / 1e6:.2f} M params)",
                "steps": self.step,
                "val bpb before": f"{self.first_bpb:.3f}" if self.first_bpb is not None else "-",
                "val bpb after": f"{last_bpb:.3f}",
                "tokens/s (last)": f"{tok_s:,.0f}",
                "wall time": f"{wall:.0f} s",
            }
            self.log(summary_text(info, sample))
        dist_util.barrier(self.dist)
        dist_util.shutdown(self.dist)
        return result


def load_run_config(run_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(read_json(Path(run_dir) / "train_config.json", "trainer options"))
