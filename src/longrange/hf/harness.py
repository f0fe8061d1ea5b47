"""lm-evaluation-harness on longrange models: a local bits-per-byte task, and the check that
lm-eval's number is longrange's own.

``python -m longrange.hf.harness compare MODEL_DIR [--data builtin]`` writes the validation
split of a corpus (default: the built-in one) as a local lm-eval task (a JSON-lines file and a
YAML task, ``loglikelihood_rolling``, metrics bits_per_byte / byte_perplexity /
word_perplexity), scores the transformers directory ``MODEL_DIR`` on it with lm-eval's ``hf``
model, scores the same documents with :func:`longrange.train.evaluate.evaluate_bpb`, and
prints both. ``python -m longrange.hf.harness lm-eval ARGS...`` is lm-eval's own command line
(``lm-eval run --model hf ...``) in a process where the longrange families are registered
(a bare ``lm_eval`` process does not import ``longrange.hf``, so transformers would not know
the model type).

How the two numbers are made equal (they are the same computation, not two estimates):

- lm-eval predicts every byte of a document, the first one after a prefix token (the
  tokenizer's eos, byte 0); ``evaluate_bpb`` predicts every byte after a document's first.
  So longrange is given each document with byte 0 in front: both score exactly the
  document's bytes, each after the same context.
- lm-eval cuts a document into windows of its ``max_length``; its last window re-reads earlier
  bytes for context, which ``evaluate_bpb``'s chunks do not. So lm-eval gets a ``max_length``
  as long as the longest document (one window per document) and the model reads a window
  longer than ``max_seq_len`` in segments of ``max_seq_len`` (``segment_long_inputs``), the
  chunks ``evaluate_bpb`` reads, with the state carried across them for the families that
  carry state, as ``evaluate_bpb`` carries it.

Documents that are not valid UTF-8 are left out of the task (lm-eval works on text), on both
sides. Nothing here reaches the network; run it with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longrange.data.corpus import Document, load_corpus
from longrange.hf.auto import directory_family, from_pretrained
from longrange.models.base import LongRangeLM
from longrange.train.evaluate import evaluate_bpb

TASK_NAME = "longrange_bpb"
DOCS_FILE = "documents.jsonl"
PREFIX_TOKEN = 0  # the byte tokenizer's eos: lm-eval's prefix for a tokenizer without BOS
AGREEMENT = 1e-4  # bits per byte; the two sums differ only in float rounding

_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


def text_documents(docs: Iterable[Document]) -> list[str]:
    """The documents that are valid UTF-8, as text (lm-eval's tasks are text)."""
    out = []
    for doc in docs:
        try:
            text = bytes(doc.tokens).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            out.append(text)
    return out


def write_task(directory: str | os.PathLike, texts: Sequence[str], *, name: str = TASK_NAME) -> Path:
    """Write the documents ``texts`` as the lm-eval task ``name`` into ``directory``
    (``documents.jsonl`` + ``<name>.yaml``); return the YAML's path."""
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings")
    if not name.isidentifier():
        raise ValueError(f"task name must be a Python identifier, got {name!r}")
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = root / DOCS_FILE
    with data.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    yaml_path = root / f"{name}.yaml"
    yaml_path.write_text(
        _TASK_YAML.format(name=name, data=json.dumps(str(data)), cache=json.dumps(str(root / "cache")))
    )
    return yaml_path


def lm_eval_scores(
    model_dir: str | os.PathLike,
    task_dir: str | os.PathLike,
    texts: Sequence[str],
    *,
    name: str = TASK_NAME,
    device: str = "cpu",
    batch_size: int = 1,
) -> dict[str, float]:
    """Score the transformers directory ``model_dir`` on the task in ``task_dir`` (made by
    :func:`write_task` from ``texts``) with lm-eval's ``hf`` model; return its metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    longest = max(len(t.encode("utf-8")) for t in texts)
    model_args = {
        "pretrained": str(model_dir),
        "backend": "causal",
        "prefix_token_id": PREFIX_TOKEN,
        "max_length": max(longest, 1),  # one window per document (module docstring)
        "segment_long_inputs": True,
    }
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[name],
        task_manager=manager,
        batch_size=batch_size,
        device=device,
    )
    metrics = results["results"][name]
    return {
        key.split(",")[0]: float(value)
        for key, value in metrics.items()
        if key.endswith(",none") and isinstance(value, (int, float))
    }


def longrange_bits_per_byte(model: LongRangeLM, texts: Sequence[str], *, device: str = "cpu") -> float:
    """``evaluate_bpb`` of ``texts``, each read after the prefix byte lm-eval puts in front."""
    docs = [
        Document(str(i), np.frombuffer(bytes([PREFIX_TOKEN]) + t.encode("utf-8"), dtype=np.uint8))
        for i, t in enumerate(texts)
    ]
    return evaluate_bpb(model.to(device), docs, seq_len=model.config.max_seq_len, device=device)


def compare(
    model_dir: str | os.PathLike,
    texts: Sequence[str],
    task_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    batch_size: int = 1,
) -> tuple[float, float]:
    """(lm-eval's bits per byte, longrange's) of ``texts`` for the model in ``model_dir``."""
    directory_family(model_dir)  # a clear error before lm-eval takes a missing path for a Hub name
    write_task(task_dir, texts)
    scores = lm_eval_scores(model_dir, task_dir, texts, device=device, batch_size=batch_size)
    model = from_pretrained(model_dir).longrange
    return scores["bits_per_byte"], longrange_bits_per_byte(model, texts, device=device)


# --- the command line -----------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longrange.hf.harness", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="lm-eval's bits per byte beside longrange's, on one corpus split")
    c.add_argument("model", metavar="MODEL_DIR", help="a transformers directory (longrange export-hf)")
    c.add_argument("--data", default="builtin", help="'builtin' (default), a text file, a folder or a .jsonl")
    c.add_argument("--max-docs", type=int, default=None, help="score only the first N validation documents")
    c.add_argument(
        "--task-dir", default=None, help="keep the lm-eval task here (default: a temporary folder)"
    )
    c.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    c.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    sub.add_parser(
        "lm-eval", help="lm-eval's command line with the longrange families registered", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *argv[1:]]
        cli_evaluate()
        return 0
    args = _parser().parse_args(argv)
    try:
        return _compare_command(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"longrange.hf.harness: error: {err}", file=sys.stderr)
        return 2


def _compare_command(args: Any) -> int:
    if args.max_docs is not None and args.max_docs < 1:
        raise ValueError(f"--max-docs must be a positive integer, got {args.max_docs}")
    directory_family(args.model)
    corpus = load_corpus(args.data)
    texts = text_documents(corpus.val[: args.max_docs])
    if not texts:
        raise ValueError(f"no UTF-8 validation documents in {corpus.name}")
    with tempfile.TemporaryDirectory() as scratch:
        task_dir = args.task_dir or scratch
        hf_bpb, lr_bpb = compare(args.model, texts, task_dir, device=args.device, batch_size=args.batch_size)
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(f"documents: {len(texts)} validation documents of {corpus.name}, {size} bytes")
    print(f"lm-eval (hf, loglikelihood_rolling): {hf_bpb:.6f} bits per byte")
    print(f"longrange evaluate_bpb (same documents, after byte {PREFIX_TOKEN}): {lr_bpb:.6f} bits per byte")
    if not math.isclose(hf_bpb, lr_bpb, abs_tol=AGREEMENT):
        print(f"the two differ by more than {AGREEMENT}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
