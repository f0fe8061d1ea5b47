"""``longrange train``: train a model and write a run folder, or resume one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from longrange.cli.loading import KEEP_DENORMALS_HELP, denormals_flushable, model_settings, use_cpu_cache
from longrange.models.registry import FAMILIES, get_family

# ``longrange train`` flag -> TrainConfig field. Every flag defaults to None (or False), so a
# resumed run can tell the flags given from the ones left out.
TRAIN_FLAGS = {
    "model": "--model",
    "preset": "--preset",
    "set": "--set",
    "data": "--data",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "steps": "--steps",
    "lr": "--lr",
    "warmup": "--warmup",
    "accum": "--accum",
    "eval_every": "--eval-every",
    "eval_tokens": "--eval-tokens",
    "save_every": "--save-every",
    "max_nonfinite_steps": "--max-nonfinite-steps",
    "seed": "--seed",
    "device": "--device",
    "precision": "--precision",
    "out": "--out",
    "name": "--name",
    "fsdp": "--fsdp",
    "compile": "--compile",
    "progress": "--no-progress",
    "flush_denormals": "--keep-denormals",
}
# TrainConfig fields (on by default) -> the argparse name of the flag that turns them off
SWITCHED_OFF = {"progress": "no_progress", "flush_denormals": "keep_denormals"}


def _train_fields(args: argparse.Namespace, family: str) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (``--set`` parsed for ``family``)."""
    fields: dict[str, Any] = {}
    for name in TRAIN_FLAGS:
        if name == "set":
            if args.set:
                fields["set"] = model_settings(family, args.set)
        elif name in SWITCHED_OFF:  # a --no-... style flag turns a field that defaults on off
            if getattr(args, SWITCHED_OFF[name]):
                fields[name] = False
        elif name in ("fsdp", "compile"):
            if getattr(args, name):
                fields[name] = True
        elif getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def cmd_train(args: argparse.Namespace) -> int:
    from longrange.train.config import RESUME_SAFE, TrainConfig, same_option
    from longrange.train.trainer import Trainer, load_run_config

    if args.resume:
        run = Path(args.resume)
        if not run.is_dir():
            raise FileNotFoundError(f"--resume {args.resume}: no such run folder")
        saved = load_run_config(run)
        given = _train_fields(args, saved.model)
        if "set" in given:
            given["set"] = {**saved.set, **given["set"]}
        changed = {k: v for k, v in given.items() if not same_option(k, getattr(saved, k), v)}
        fixed = [TRAIN_FLAGS[k] for k in changed if k not in RESUME_SAFE]
        if fixed:
            allowed = ", ".join(TRAIN_FLAGS[k] for k in TRAIN_FLAGS if k in RESUME_SAFE)
            raise ValueError(
                f"--resume continues {args.resume} with its own {', '.join(fixed)}: "
                f"they decide the model, the data order or the run folder (start a new run to change "
                f"them); a resume may change {allowed}"
            )
        trainer = Trainer(TrainConfig(**{**saved.to_dict(), **changed}), resume=args.resume)
        if changed:  # said once the checks have passed
            listed = ", ".join(
                TRAIN_FLAGS[k] if isinstance(v, bool) else f"{TRAIN_FLAGS[k]} {v} (was {getattr(saved, k)})"
                for k, v in changed.items()
            )
            print(f"longrange train: resuming {args.resume} with {listed}", file=sys.stderr)
        use_cpu_cache(str(trainer.device), not args.no_cpu_cache, "train")
        denormals_flushable(str(trainer.device), trainer.cfg.flush_denormals, "train")  # the note, if any
        trainer.fit()
        return 0
    family_name = args.model or "vanilla"
    family = get_family(family_name)
    fields = _train_fields(args, family_name)
    fields["model"] = family_name
    if args.preset is None:
        fields["preset"] = "small" if "small" in family.presets else next(iter(family.presets), None)
    trainer = Trainer(TrainConfig(**fields))
    use_cpu_cache(str(trainer.device), not args.no_cpu_cache, "train")
    denormals_flushable(str(trainer.device), trainer.cfg.flush_denormals, "train")  # the note, if any
    trainer.fit()
    return 0


def add_parser(sub: Any) -> None:
    families = ", ".join(FAMILIES)
    t = sub.add_parser("train", help="train a model and write a run folder")
    t.add_argument("--model", default=None, help=f"model family ({families}); default vanilla")
    t.add_argument(
        "--preset", default=None, help="preset of the family (see `longrange models`); default small"
    )
    t.add_argument(
        "--data", default=None, help="'builtin' (default), a text file, a folder, or a .jsonl file"
    )
    t.add_argument(
        "--seq-len", type=int, default=None, help="training window (default: the model's max_seq_len)"
    )
    t.add_argument("--batch-size", type=int, default=None, help="sequences per step per process (default 16)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 30)")
    t.add_argument("--accum", type=int, default=None, help="gradient accumulation steps (default 1)")
    t.add_argument("--eval-every", type=int, default=None, help="steps between validations (default 100)")
    t.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation")
    t.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default 100)")
    t.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=None,
        help="stop after this many steps in a row with a non-finite loss or gradient, each skipped "
        "without an update (default 5)",
    )
    t.add_argument("--device", default=None, help="auto (default: CUDA if present), cpu, cuda, cuda:1, ...")
    t.add_argument(
        "--precision", default=None, help="auto (default: bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"
    )
    t.add_argument("--out", default=None, help="parent folder of run folders (default runs)")
    t.add_argument("--name", default=None, help="run folder name (default <model>-<preset>)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue the run in folder RUN from its latest checkpoint; --steps, --lr, --warmup, "
        "--eval-every, --eval-tokens, --save-every, --max-nonfinite-steps, --device, --precision and "
        "--no-progress may change, the other options may not",
    )
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    t.add_argument("--fsdp", action="store_true", help="shard the model with FSDP under torchrun")
    t.add_argument("--compile", action="store_true", help="run the training step through torch.compile")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="set any model config field, e.g. --set depth=6"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--no-cpu-cache",
        action="store_true",
        help="on CPU, keep torch's own allocator (default: cache large blocks, see longrange.cpu_cache)",
    )
    t.add_argument("--keep-denormals", action="store_true", help=KEEP_DENORMALS_HELP)
    t.set_defaults(func=cmd_train)
