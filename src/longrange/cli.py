"""The ``longrange`` command: train, generate, eval, models, bench."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from longrange.models.base import CONFIG_NAME, LongRangeLM
from longrange.models.registry import FAMILIES, get_family


def _model_settings(family: str, settings: list[str]) -> dict[str, Any]:
    cls = get_family(family).config_class
    out = {}
    for text in settings:
        key, value = cls.parse_setting(text)
        out[key] = value
    return out


KEEP_WEIGHTS_SET_HELP = (
    "change a model setting that keeps the weights, e.g. --set num_retrieved_memories=0 "
    "(memorizing with retrieval off)"
)


def _load_model(path: str, device: str, settings: list[str] | None = None) -> LongRangeLM:
    """A run folder (its latest weights) or any model directory written by save_pretrained,
    with ``--set`` changes that keep the weights (e.g. num_retrieved_memories=0)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint")
    if not (p / CONFIG_NAME).is_file() and (p / "best" / CONFIG_NAME).is_file():
        p = p / "best"
    overrides = None
    if settings:
        from longrange.atomic import read_json

        data = read_json(p / CONFIG_NAME, "model config")
        if not isinstance(data, dict) or "family" not in data:
            raise ValueError(f"{p / CONFIG_NAME} is not a longrange config (no 'family' key)")
        overrides = _model_settings(data["family"], settings)
    return LongRangeLM.from_pretrained(p, map_location=device, overrides=overrides)


def _device(name: str) -> str:
    from longrange.train.distributed import pick_device

    return str(pick_device(name))


# --- subcommands ------------------------------------------------------------------------------
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
    "progress": "--no-progress",
}


def _train_fields(args: argparse.Namespace, family: str) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (``--set`` parsed for ``family``)."""
    fields: dict[str, Any] = {}
    for name in TRAIN_FLAGS:
        if name == "set":
            if args.set:
                fields["set"] = _model_settings(family, args.set)
        elif name == "progress":
            if args.no_progress:
                fields["progress"] = False
        elif name == "fsdp":
            if args.fsdp:
                fields["fsdp"] = True
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
        trainer.fit()
        return 0
    family_name = args.model or "vanilla"
    family = get_family(family_name)
    fields = _train_fields(args, family_name)
    fields["model"] = family_name
    if args.preset is None:
        fields["preset"] = "small" if "small" in family.presets else next(iter(family.presets), None)
    Trainer(TrainConfig(**fields)).fit()
    return 0


def _check_number(flag: str, value: float | None, *, low: float, high: float | None = None, open_low=False):
    """Refuse NaN, inf and values outside [low, high] (or (low, high]) before any work."""
    if value is None:
        return
    inside = value > low if open_low else value >= low
    if not math.isfinite(value) or not inside or (high is not None and value > high):
        bound = f"({low}" if open_low else f"[{low}"
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{flag} must be a finite number in {bound}, {upper}, got {value}")


def cmd_generate(args: argparse.Namespace) -> int:
    from longrange.data.tokenizer import ByteTokenizer

    _check_number("--temperature", args.temperature, low=0.0)
    _check_number("--top-p", args.top_p, low=0.0, high=1.0, open_low=True)
    _check_number("--repetition-penalty", args.repetition_penalty, low=0.0, open_low=True)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    device = _device(args.device)
    model = _load_model(args.run, device, args.set).eval()
    vocab = model.config.vocab_size
    if args.eos_token is not None and not 0 <= args.eos_token < vocab:
        raise ValueError(f"--eos-token must be a token id in [0, {vocab}), got {args.eos_token}")
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    new = model.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token=args.eos_token,
        repetition_penalty=args.repetition_penalty,
        generator=gen,
    )
    sys.stdout.write(args.prompt + tok.decode(new) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from longrange.data.corpus import load_corpus
    from longrange.train.evaluate import evaluate_bpb

    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be a positive integer, got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    device = _device(args.device)
    model = _load_model(args.run, device, args.set)
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len and not model.carries_state:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    corpus = load_corpus(args.data)
    problem = corpus.validation_problem()
    if problem is not None:
        raise ValueError(f"no validation tokens: {problem}")
    bpb = evaluate_bpb(model, corpus.val, seq_len=seq_len, max_tokens=args.max_tokens, device=device)
    print(f"validation bits per byte: {bpb:.4f}  ({corpus.summary()})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from longrange.models.registry import available_families

    rows = []
    for name in available_families():
        fam = get_family(name)
        for preset, make in fam.presets.items():
            with torch.device("meta"):
                params = fam.model_class(make()).num_params()
            rows.append((name, preset, f"{params / 1e6:.2f} M", fam.description))
    print(f"{'family':<16}{'preset':<10}{'params':>10}  description")
    for family, preset, params, desc in rows:
        print(f"{family:<16}{preset:<10}{params:>10}  {desc}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from longrange.bench.suites import run_suite
    from longrange.models.registry import available_families

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.models == "all":
        models = available_families()
    else:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        get_family(m)
    try:
        low, high = (int(x) for x in args.listops_length.split(","))
    except ValueError:
        raise ValueError(
            f"--listops-length must be MIN,MAX (two integers), got {args.listops_length!r}"
        ) from None
    if not 1 <= low <= high:
        raise ValueError(f"--listops-length needs 1 <= MIN <= MAX, got {args.listops_length!r}")
    options = {
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "out": args.out,
        "no_memory": args.no_memory,
        "compare_reference": args.compare_reference,
        "steps": args.steps,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "readme": args.readme,
        "listops_length": (low, high),
        "reference_lengths": (
            [int(x) for x in args.reference_lengths.split(",") if x.strip()]
            if args.reference_lengths
            else None
        ),
    }
    run_suite(args.suite, models, lengths, device=_device(args.device), options=options)
    return 0


def _hf_export():
    try:
        from longrange.hf import export
    except ImportError as err:
        raise ValueError(f"this command needs transformers: pip install 'longrange[hf]' ({err})") from None
    return export


def cmd_export_hf(args: argparse.Namespace) -> int:
    _hf_export().export_hf(args.source, args.out, overwrite=args.overwrite)
    print(f"wrote a transformers model directory to {args.out}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    _hf_export().import_hf(args.source, args.out, overwrite=args.overwrite)
    print(f"wrote a longrange model directory to {args.out}")
    return 0


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longrange", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="set any model config field, e.g. --set depth=6"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample text from a run folder or checkpoint")
    g.add_argument("run", metavar="RUN_OR_CKPT", help="run folder or model directory")
    g.add_argument("--prompt", default="\n", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely bytes")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--eos-token", type=int, default=None, help="stop at this byte value")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (default 1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help=KEEP_WEIGHTS_SET_HELP)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="validation bits per byte of a run folder or checkpoint")
    e.add_argument("run", metavar="RUN_OR_CKPT", help="run folder or model directory")
    e.add_argument(
        "--data", default=None, help="'builtin' (default), a text file, a folder, or a .jsonl file"
    )
    e.add_argument("--seq-len", type=int, default=None, help="chunk length (default: max_seq_len)")
    e.add_argument("--max-tokens", type=int, default=None, help="stop after this many predicted bytes")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help=KEEP_WEIGHTS_SET_HELP)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("models", help="list families, presets and parameter counts")
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="benchmarks: speed, memory, generation, recall, quality; report")
    b.add_argument(
        "suite",
        choices=["speed", "memory", "generate", "recall", "quality", "listops", "knn", "report"],
        help="speed (time, tokens/s, MFU, growth, peak memory), memory, generate (decoding tokens/s), "
        "recall (synthetic tasks), quality (bits per byte after a fixed budget), "
        "listops (Long Range Arena classification), knn (memorizing's chunk cost and recall@k as its "
        "memory fills to each of --lengths entries), report (plots + README tables)",
    )
    b.add_argument("--models", default="vanilla", help="comma-separated families, or 'all' (default vanilla)")
    b.add_argument("--lengths", default="1024,4096", help="comma-separated sequence lengths (speed, memory)")
    b.add_argument("--batch-size", type=int, default=1, help="batch size (default 1)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median reported)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda")
    b.add_argument("--out", default="benchmarks/results", help="results folder (default benchmarks/results)")
    b.add_argument(
        "--no-memory", action="store_true", help="speed: skip the fresh-process memory measurement"
    )
    b.add_argument(
        "--compare-reference", action="store_true", help="speed: also time the installed reference packages"
    )
    b.add_argument(
        "--reference-lengths",
        default=None,
        help="speed: lengths at which --compare-reference times the references (default: --lengths)",
    )
    b.add_argument(
        "--steps", type=int, default=None, help="recall / quality / listops: training steps per family"
    )
    b.add_argument(
        "--listops-length",
        default="500,2000",
        help="listops: MIN,MAX characters per expression (default 500,2000, as Long Range Arena)",
    )
    b.add_argument("--prompt-len", type=int, default=1024, help="generate: prompt length (default 1024)")
    b.add_argument("--new-tokens", type=int, default=1024, help="generate: tokens to decode (default 1024)")
    b.add_argument("--readme", default="README.md", help="report: the README whose tables are rewritten")
    b.set_defaults(func=cmd_bench)

    x = sub.add_parser(
        "export-hf", help="a model directory as a transformers directory (needs longrange[hf])"
    )
    x.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="a directory LongRangeLM.from_pretrained reads")
    x.add_argument("out", metavar="OUT_DIR", help="the transformers directory to write")
    x.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
    x.set_defaults(func=cmd_export_hf)

    i = sub.add_parser("import-hf", help="a transformers directory as a longrange model directory")
    i.add_argument("source", metavar="HF_DIR", help="a transformers directory of a longrange family")
    i.add_argument("out", metavar="OUT_DIR", help="the longrange model directory to write")
    i.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
    i.set_defaults(func=cmd_import_hf)
    return parser


def _error_line(err: BaseException) -> str:
    """One line for an expected error: an OSError names its path and the cause."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err).replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    from longrange.train.interrupts import TrainingInterrupted
    from longrange.train.resume import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"longrange {args.command}: error: {_error_line(err)}", file=sys.stderr)
        return 2
    except (OSError, TrainingDiverged) as err:
        # The run failed while working (a full disk, a read-only folder, non-finite training).
        print(f"longrange {args.command}: error: {_error_line(err)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        resume = f"; continue with: longrange train --resume {err.run_dir}" if err.run_dir else ""
        print(f"longrange {args.command}: {err}{resume}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
