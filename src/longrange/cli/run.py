"""``longrange generate``, ``eval`` and ``models``: use a trained model, list the families."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from longrange.cli.loading import (
    KEEP_DENORMALS_HELP,
    KEEP_WEIGHTS_SET_HELP,
    check_number,
    flushed_denormals,
    load_model,
    pick_device,
)
from longrange.models.registry import get_family


def cmd_generate(args: argparse.Namespace) -> int:
    from longrange.data.tokenizer import ByteTokenizer

    check_number("--temperature", args.temperature, low=0.0)
    check_number("--top-p", args.top_p, low=0.0, high=1.0, open_low=True)
    check_number("--repetition-penalty", args.repetition_penalty, low=0.0, open_low=True)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed must be an integer in [-2**63, 2**64), got {args.seed}")
    # the bytes as typed: arguments that are not UTF-8 reach Python as lone surrogates
    prompt_bytes = args.prompt.encode("utf-8", "surrogateescape")
    if not prompt_bytes:
        raise ValueError("--prompt must hold at least one character (the text to continue)")
    device = pick_device(args.device)
    model = load_model(args.run, device, args.set).eval()
    vocab = model.config.vocab_size
    if args.eos_token is not None and not 0 <= args.eos_token < vocab:
        raise ValueError(f"--eos-token must be a token id in [0, {vocab}), got {args.eos_token}")
    tok = ByteTokenizer()
    prompt = tok.encode(prompt_bytes).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with flushed_denormals(device, not args.keep_denormals, "generate"):
        new = model.generate(
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token=args.eos_token,
            repetition_penalty=args.repetition_penalty,
            generator=gen,
            compile=args.compile,
        )
    if args.eos_token is not None:
        # generate pads what follows the end with the eos byte: the text stops at the first
        ends = (new == args.eos_token).nonzero()
        if len(ends):
            new = new[: int(ends[0, 0]) + 1]
    sys.stdout.write(tok.decode(prompt_bytes + tok.decode_bytes(new.cpu())) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from longrange.data.corpus import load_corpus
    from longrange.train.evaluate import evaluate_bpb

    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be a positive integer, got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    device = pick_device(args.device)
    model = load_model(args.run, device, args.set)
    seq_len = args.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len and not model.carries_state:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    corpus = load_corpus(args.data)
    problem = corpus.validation_problem()
    if problem is not None:
        raise ValueError(f"no validation tokens: {problem}")
    with flushed_denormals(device, not args.keep_denormals, "eval"):
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


def add_parsers(sub: Any) -> None:
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
    g.add_argument(
        "--compile",
        action="store_true",
        help="run the decoding steps through torch.compile (faster steps after a compilation of seconds)",
    )
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help=KEEP_WEIGHTS_SET_HELP)
    g.add_argument("--keep-denormals", action="store_true", help=KEEP_DENORMALS_HELP)
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
    e.add_argument("--keep-denormals", action="store_true", help=KEEP_DENORMALS_HELP)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("models", help="list families, presets and parameter counts")
    m.set_defaults(func=cmd_models)
