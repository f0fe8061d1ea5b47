"""The longrange command: train, generate, eval, models, bench, export-hf, import-hf."""

from __future__ import annotations

import argparse
import sys

from longrange.cli import bench, hf, run, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longrange", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    run.add_parsers(sub)
    bench.add_parser(sub)
    hf.add_parsers(sub)
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
