"""`stapo` command line. Each concern registers its own sub-command; imports stay lazy so `--help` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module exposing `add_parser(subparsers)`; the parser sets `func(args) -> int`
SUBCOMMANDS = {
    "train": "stapo.trainer.cli",
    "eval": "stapo.eval.cli",
    "data": "stapo.data.cli",
    "plot": "stapo.trainer.plots",
    "analyze": "stapo.diagnostics.cli",
    "config": "stapo.config.cli",
}


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """The one quiet flag of every command: ``--quiet`` (``-q``); ``--no-progress`` is the same flag."""
    parser.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress output (--no-progress is the same flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stapo",
        description="Stable RL fine-tuning on verifiable rewards (STAPO and baselines).",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("stapo"):
                continue  # sub-command not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. A user error (bad config, data, run directory, checkpoint, a missing file)
    prints one line and returns 2; ``--debug`` lets its traceback through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .errors import UserError

    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"stapo {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
