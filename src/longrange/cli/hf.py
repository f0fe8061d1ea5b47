"""``longrange export-hf`` / ``import-hf``: convert model directories (needs longrange[hf])."""

from __future__ import annotations

import argparse
from typing import Any


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


def add_parsers(sub: Any) -> None:
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
