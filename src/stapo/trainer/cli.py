"""`stapo train [CONFIG.yaml] [key=value ...] [--resume RUN_DIR]`."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from ..cli import add_quiet_flag
from ..config.keys import KEYS_HERE, KeysHelpFormatter

EPILOG = """examples:
  stapo train                                   # the built-in demo (tiny model, synthetic arithmetic)
  stapo train objective.name=grpo seed=1        # the demo with another objective
  stapo train configs/stapo_qwen3_1p7b.yaml rollout.n=4 optim.lr=2e-6
  stapo train configs/stapo_qwen3_1p7b.yaml preset=justrl    # the paper's matched baseline (docs/recipes.md)
  stapo train --resume runs/stapo-s0-20261127-1200 steps=400 optim.lr=1e-5

Precedence: the file, then an objective chosen on the command line (preset=X or objective.name=X: X with
its own defaults, none of the file's objective options), then the other KEY=VALUE overrides, in order.
`stapo config [CONFIG] [KEY=VALUE ...]` prints the config that results, without training.

--resume applies the overrides from the checkpoint's step on (lr, weight decay and betas go into the
restored optimizer) and records them in RUN_DIR/config_history.jsonl; it refuses the keys that would
break the run (seed, data.train, data.shuffle, rollout.n, the model, its dtype and LoRA shape). A bad
config, data file, run directory or checkpoint exits with status 2 and one line; `stapo --debug train ...`
shows the traceback. Faults and their messages: docs/reliability.md.

""" + KEYS_HERE + "\n"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run RLVR training (no config: the built-in demo)",
        description="Train a policy with STAPO or a baseline objective. Without CONFIG, runs the built-in demo. "
        "Overrides use dotted keys: objective.name=grpo rollout.n=4.",
        epilog=EPILOG,
        formatter_class=KeysHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE", help="optional YAML config, then overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    add_quiet_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Errors in the config, data, run directory or checkpoints raise ``UserError``: `stapo` prints
    them as one line and exits with status 2 (``--debug`` for the traceback)."""
    from ..config import build_config, objective_line
    from ..config.cli import split_config_args
    from ..errors import UserError

    config_path, overrides = split_config_args(args.args)
    if args.resume:
        if config_path:
            raise UserError("--resume reads RUN_DIR/config.yaml; give only key=value overrides with it")
        if not Path(args.resume).is_dir():
            raise UserError(f"--resume {args.resume}: no such run directory")
        config_path = str(Path(args.resume) / "config.yaml")
    cfg = build_config(config_path, overrides)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:  # even with --quiet (progress only); once under torchrun
        print(objective_line(cfg), flush=True)
    from .loop import Interrupted, TrainingStopped, train
    from .rundir import RunFinished
    from .summary import print_summary

    try:
        run_dir = train(cfg, resume=args.resume, quiet=args.quiet)
    except RunFinished as err:  # said before the model loads; nothing was changed
        if main_rank:
            print(f"stapo train: {err}", flush=True)
        return 0
    except TrainingStopped as err:
        raise SystemExit(f"training stopped: {err}") from None
    except Interrupted as err:  # saved: a scheduler reads 128 + the signal as "stopped by it", and requeues
        if main_rank:
            print(f"stapo train: interrupted by {err}", file=sys.stderr, flush=True)
        return 128 + err.signum
    except OSError as err:  # a full disk or quota on any write (config, dumps, plots): checkpoints are atomic
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = err.filename or f"a file under {args.resume or cfg.output_dir}"
        how = f"`stapo train --resume {args.resume}`" if args.resume else "`stapo train --resume RUN_DIR`"
        raise UserError(f"cannot write {where} ({os.strerror(err.errno)}); every checkpoint already saved is intact: "
                        f"free space, then {how}") from None
    if main_rank:  # once under torchrun
        print_summary(run_dir)
    return 0
