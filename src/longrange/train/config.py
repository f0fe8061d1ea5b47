"""The trainer's options (the CLI's ``longrange train`` flags map onto these fields).

A resumed run keeps the options that decide its model, its data order and its folder
(:data:`FIXED_ON_RESUME`); the others (:data:`RESUME_SAFE`: length, schedule, evaluation,
checkpoints, device) may change, and the run continues from its checkpoint under them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

# Options a resumed run may change: none of them touches the weights' layout, the data order
# or the carried state. (A new --steps or --lr changes the schedule from the resume on.)
RESUME_SAFE = frozenset(
    {
        "steps",
        "lr",
        "warmup",
        "min_lr_ratio",
        "grad_clip",
        "eval_every",
        "eval_tokens",
        "log_every",
        "save_every",
        "device",
        "precision",
        "sample_tokens",
        "prompt",
        "progress",
        "max_nonfinite_steps",
        "compile",
        "flush_denormals",
    }
)


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
    # run the training forward through torch.compile (the same maths; faster where the
    # backend generates code, as on a GPU)
    compile: bool = False
    progress: bool = True
    # A step whose loss or gradients are not finite is skipped (no optimizer update); this
    # many in a row stop the run with an error.
    max_nonfinite_steps: int = 5
    # On CPU, fit() runs with subnormal numbers flushed to zero on every thread of torch's pool
    # (longrange.ops.numerics; a trained model's tiny attention weights otherwise make matmuls
    # up to 100x slower); the results differ only where a value was subnormal.
    flush_denormals: bool = True

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "steps",
            "accum",
            "eval_every",
            "eval_tokens",
            "log_every",
            "save_every",
            "max_nonfinite_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 2):
            raise ValueError(f"seq_len must be an integer of at least 2, got {self.seq_len!r}")
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not _finite(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value}")
        if not isinstance(self.sample_tokens, int) or self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be an integer >= 0, got {self.sample_tokens!r}")
        for name in ("fsdp", "compile", "progress", "flush_denormals"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        # np.random.default_rng takes no negative seed, torch.manual_seed none from 2**64 on
        # (and each process adds its rank): refused here, not after the run folder is made.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.name is not None and (
            not isinstance(self.name, str)
            or self.name in ("", ".", "..")
            or any(sep and sep in self.name for sep in (os.sep, os.altsep, "/"))
        ):
            raise ValueError(
                f"name must be a folder name (not empty, '.' or '..', no '/'): the run folder made "
                f"under out, got {self.name!r}"
            )
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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _comparable(name: str, value: Any) -> Any:
    if name == "data":
        # a relative path means the file it names from here (runs record absolute ones)
        return "builtin" if value in (None, "builtin") else os.path.abspath(value)
    return json.loads(json.dumps(value))  # tuples and lists compare equal, as after a save


def same_option(name: str, a: Any, b: Any) -> bool:
    """Whether two values of option ``name`` mean the same (as train_config.json holds them)."""
    return _comparable(name, a) == _comparable(name, b)


def resume_changes(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """The names of the options ``given`` changes from the run's ``saved`` ones; ValueError
    naming them when any is not :data:`RESUME_SAFE`."""
    changed = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if not same_option(f.name, getattr(saved, f.name), getattr(given, f.name))
    ]
    fixed = [name for name in changed if name not in RESUME_SAFE]
    if fixed:
        raise ValueError(
            f"a resumed run keeps its {', '.join(fixed)} (they decide the model, the data order "
            f"or the run folder); start a new run to change them. Options a resume may change: "
            f"{', '.join(sorted(RESUME_SAFE))}"
        )
    return changed
