"""AdamW with decoupled weight decay on matrices only, the learning-rate schedule, and the
precision a run trains in."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longrange.train.config import TrainConfig


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


def non_finite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters and optimizer moments holding NaN or inf."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    names = {id(p): name for name, p in model.named_parameters()}
    for param, slots in optimizer.state.items():
        for slot, value in slots.items():
            if (
                isinstance(value, Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ):
                bad.append(f"{names.get(id(param), '?')} ({slot})")
    return bad
