"""The trainer's options (the CLI's ``longrange train`` flags map onto these fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class TrainConfig:
    model: str = "vanilla"
    preset: str | None = "small"
    set: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    seq_len: int | None = None
    batch_size: int = 16
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    accum: int = 1
    eval_every: int = 100
    eval_tokens: int = 131072
    log_every: int = 10
    save_every: int = 100
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    out: str = "runs"
    name: str | None = None
    sample_tokens: int = 200
    prompt: str = "def "
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "steps", "accum", "eval_every", "log_every", "save_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown trainer option(s) {unknown}")
        return cls(**data)
