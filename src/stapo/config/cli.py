"""`stapo config [CONFIG.yaml] [key=value ...]`: the config a `stapo train` with the same arguments runs.

    stapo config configs/stapo_qwen3_1p7b.yaml preset=justrl   # the resolved config, as config.yaml holds it
    stapo config --keys                                        # every key: type, default, allowed values
"""

from __future__ import annotations

import argparse
import os
import sys


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] KEY=VALUE ...`` -> (the config file or None, the overrides)."""
    args = list(args)
    return (args.pop(0) if args and "=" not in args[0] else None), args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "config",
        help="show the resolved config of a train command, or list every config key",
        description="Print the config that `stapo train` with the same arguments would run (YAML, as the run's "
        "config.yaml holds it, with the objective's line on top), or with --keys every key with its type, "
        "default and allowed values. Precedence: the file, then preset=X / objective.name=X (that objective "
        "with its own defaults), then the other KEY=VALUE overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE", help="optional YAML config, then overrides")
    p.add_argument("--keys", action="store_true", help="list every config key and each objective's options")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from ..errors import UserError
    from . import build_config, objective_line, to_dict
    from .keys import keys_text

    if args.keys:
        if args.args:
            raise UserError("--keys takes no CONFIG or KEY=VALUE")
        return _write(keys_text() + "\n")
    cfg = build_config(*split_config_args(args.args))
    return _write(f"# {objective_line(cfg)}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _write(text: str) -> int:
    """Print ``text``; a reader that stops early (``| head``) is no error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is quiet too
    return 0
