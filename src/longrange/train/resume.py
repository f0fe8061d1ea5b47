"""A trainer into a checkpoint and back: everything an exact resume needs.

Saved with every checkpoint (see :mod:`longrange.train.checkpoint` for the files): the
weights, the optimizer moments and step counts, the step (the learning rate is a function of
it and the options), the fp16 loss scale, the best and first validation bpb, the skipped-step
counters, and per process the sampler position (for document streams: the document and the
offset inside it), the RNG states of torch (CPU and CUDA), Python and NumPy, and the carried
state of families that carry one (``model.save_state(state, directory)`` /
``model.load_state(directory, batch_size=, device=)``). The metrics file is cut back to the
checkpoint's step when the run resumes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from longrange.atomic import read_json
from longrange.models.base import CONFIG_NAME
from longrange.train import distributed as dist_util
from longrange.train.checkpoint import (
    CHECKPOINTS,
    Checkpoint,
    begin_checkpoint,
    publish_checkpoint,
    read_checkpoint,
    restore_rng,
    step_folder_name,
    write_rank_files,
    write_shared_files,
)
from longrange.train.config import TrainConfig, resume_changes
from longrange.train.evaluate import close_state
from longrange.train.optim import lr_at, non_finite_tensors
from longrange.train.run_folder import failure

# The functions below take the Trainer (longrange.train.trainer, which imports this module).
Trainer = Any


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite, or the weights became non-finite."""


def load_run_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / "train_config.json"
    data = read_json(path, "trainer options")
    if not isinstance(data, dict):
        raise ValueError(f"corrupt trainer options {path}: not a JSON object of options")
    return TrainConfig.from_dict(data)


def check_resume(run_dir: Path, cfg: TrainConfig, *, world_size: int) -> tuple[Checkpoint, list[str]]:
    """The run's latest checkpoint, verified, and the options ``cfg`` changes; refused when
    the options cannot continue the run."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such run folder")
    changed = resume_changes(load_run_config(run_dir), cfg)
    steps = cfg.steps
    checkpoint = read_checkpoint(run_dir)
    model_config = read_json(checkpoint.folder / CONFIG_NAME, "model config")
    family = model_config.get("family") if isinstance(model_config, dict) else None
    if family != cfg.model:
        # The weights would be loaded as whatever they are and trained under the run's name.
        raise ValueError(
            f"{checkpoint.folder} holds a {family!r} model but the run trains {cfg.model!r} "
            "(train_config.json): the checkpoint belongs to another run"
        )
    if steps < checkpoint.step:
        raise ValueError(
            f"steps {steps} is below the run's current step {checkpoint.step}: a run cannot go back "
            "(nothing was changed); resume with --steps of at least that"
        )
    if checkpoint.world_size != world_size:
        raise ValueError(
            f"{run_dir} was trained by {checkpoint.world_size} process(es); resume it with the same "
            f"number (this is {world_size})"
        )
    return checkpoint, changed


def last_checkpoint(trainer: Trainer) -> str:
    return "none yet" if trainer.saved_step is None else f"step {trainer.saved_step}"


def save_trainer(trainer: Trainer) -> Path | None:
    """Write the checkpoint of the trainer's current step as one atomic unit; rank 0 gets its
    folder. Refuses non-finite weights or optimizer moments (TrainingDiverged); a failed write
    (a full disk) leaves the last checkpoint as it was and raises an OSError naming the path."""
    step, info = trainer.step, trainer.dist
    bad = non_finite_tensors(trainer.model, trainer.optimizer)
    if bad:
        raise TrainingDiverged(
            f"not writing a checkpoint at step {step}: {', '.join(bad[:3])} hold non-finite values; "
            f"the last checkpoint ({last_checkpoint(trainer)}) is untouched"
        )
    staging = trainer.run_dir / CHECKPOINTS / f"{step_folder_name(step)}.tmp"
    final = None
    try:
        if info.is_main:
            begin_checkpoint(trainer.run_dir, step)
        dist_util.barrier(info)
        sampler = trainer.sampler.state()
        write_rank_files(
            staging, rank=info.rank, step=step, sampler=sampler, model=trainer.model, state=trainer.state
        )
        dist_util.barrier(info)
        if info.is_main:
            scaler = trainer.scaler
            extra = {
                "best_bpb": trainer.best_bpb if math.isfinite(trainer.best_bpb) else None,
                "first_bpb": trainer.first_bpb,
                "skipped_steps": trainer.skipped_steps,
                "nonfinite_streak": trainer.nonfinite_streak,
                "lr": lr_at(max(step - 1, 0), trainer.cfg),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
            }
            optimizer_state = trainer.optimizer.state_dict()
            write_shared_files(
                staging, step=step, model=trainer.model, optimizer_state=optimizer_state, extra=extra
            )
            final = publish_checkpoint(trainer.run_dir, staging, step=step, world_size=info.world_size)
        dist_util.barrier(info)
    except OSError as err:
        if info.is_main and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        doing = f"cannot write the checkpoint of step {step}"
        raise failure(
            err, f"{doing} (the last checkpoint, {last_checkpoint(trainer)}, is untouched)"
        ) from None
    trainer.saved_step = step
    return final


def restore_trainer(trainer: Trainer, ck: Checkpoint) -> None:
    """Put the trainer where the checkpoint left it (the weights are loaded already)."""
    trainer.optimizer.load_state_dict(ck.optimizer_state)
    saved = ck.trainer
    trainer.step = trainer.saved_step = ck.step
    best = saved.get("best_bpb")
    trainer.best_bpb = math.inf if best is None else float(best)  # None: saved before a validation
    trainer.first_bpb = saved.get("first_bpb")
    trainer.skipped_steps = int(saved.get("skipped_steps", 0))
    trainer.nonfinite_streak = int(saved.get("nonfinite_streak", 0))
    if trainer.scaler is not None and saved.get("grad_scaler"):
        trainer.scaler.load_state_dict(saved["grad_scaler"])
    plain, rng_tensors, state_dir = ck.rank_state(trainer.dist.rank)
    trainer.sampler.load_state(plain.get("sampler", {}))
    model = trainer.model
    if model.carries_state:
        if state_dir is None:
            raise ValueError(f"{ck.folder} holds no carried state for the {trainer.cfg.model!r} model")
        close_state(trainer.state)
        trainer.state = model.load_state(state_dir, batch_size=trainer.cfg.batch_size, device=trainer.device)
    restore_rng(rng_tensors, plain["rng"])  # last: nothing after it may draw random numbers
