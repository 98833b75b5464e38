"""`stapo train [CONFIG.yaml] [key=value ...] [--resume RUN_DIR]`."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  stapo train                                   # the built-in demo (tiny model, synthetic arithmetic)
  stapo train objective.name=grpo seed=1        # the demo with another objective
  stapo train configs/stapo_qwen3_1p7b.yaml rollout.n=4 optim.lr=2e-6
  stapo train --resume runs/stapo-s0-20261127-1200 steps=400
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run RLVR training (no config: the built-in demo)",
        description="Train a policy with STAPO or a baseline objective. Without CONFIG, runs the built-in demo. "
        "Overrides use dotted keys: objective.name=grpo rollout.n=4.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE", help="optional YAML config, then overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import ConfigError, build_config

    config_path = None
    overrides = list(args.args)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    if args.resume:
        if config_path:
            raise SystemExit("--resume reads RUN_DIR/config.yaml; give only key=value overrides with it")
        config_path = str(Path(args.resume) / "config.yaml")
    try:
        cfg = build_config(config_path, overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    from .loop import TrainingStopped, train
    from .summary import print_summary

    try:
        run_dir = train(cfg, resume=args.resume, quiet=args.quiet)
    except TrainingStopped as err:
        raise SystemExit(f"training stopped: {err}") from None
    print_summary(run_dir)
    return 0
