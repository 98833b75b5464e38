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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stapo",
        description="Stable RL fine-tuning on verifiable rewards (STAPO and baselines).",
    )
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
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)
