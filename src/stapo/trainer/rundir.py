"""The run directory: one writer at a time, a clean start, an honest resume, the config's history.

``RUN_DIR/.lock``          an exclusive ``fcntl`` lock for the whole run, holding the writer's PID
``RUN_DIR/config.yaml``    the config in force now
``RUN_DIR/config_history.jsonl``   one line per start or resume: the step it took effect, what changed

A second ``stapo train`` on the same run directory stops before loading the model, naming the PID that
holds it. The kernel drops the lock when its holder exits, however it exits, so the lock of a killed
run is free at once; the PID it left in the file is reported when the next run takes over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
from pathlib import Path

import yaml

from ..config import TrainConfig, objective_line, to_dict
from ..distributed import broadcast_object
from ..errors import UserError
from ..locking import LOCK_FILE, DirLock, LockedError  # LOCK_FILE: re-exported
from .checkpoint import STEP_DIR, checkpoint_dirs, resume_checkpoint
from .logger import truncate_metrics
from .trackers import IDS_FILE

HISTORY = "config_history.jsonl"
# Keys a resumed run may not change, and why: the checkpoint's state depends on them.
FROZEN_ON_RESUME = {
    "seed": "the data order and the saved RNG states come from it",
    "data.train": "the saved data cursor indexes this data set",
    "data.shuffle": "the saved data cursor follows this order",
    "rollout.n": "the group size shapes advantages and the saved reuse window",
    "model.name_or_path": "the weights come from the checkpoint",
    "model.dtype": "the optimizer state was saved for this dtype",
    "model.trust_remote_code": "the checkpoint's model code is fixed",
    "model.lora.r": "the saved adapter has this shape",
    "model.lora.alpha": "the saved adapter has this scale",
    "model.lora.dropout": "the saved adapter config holds it",
    "model.lora.target_modules": "the saved adapter wraps these modules",
    "reuse.gate": "the saved gate window belongs to this gate",
    "reuse.window": "the saved gate window has this length",
    "reuse.statistic": "the saved gate window holds this statistic",
    "output_dir": "--resume names the run directory",
    "run_name": "--resume names the run directory",
}


# the lock is stapo.locking's, shared with ``stapo eval --out``
RunLock, RunLockedError = DirLock, LockedError


class RunFinished(UserError):
    """``--resume`` of a run already at its last step: nothing to train, nothing changed (exit status 0)."""


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_new_run(cfg: TrainConfig) -> None:
    """``run_name`` is a plain name and ``output_dir`` a folder this process can write: checked before any
    work, so a bad one is one line and leaves no folder."""
    name = cfg.run_name
    if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name):
        raise UserError(f"run_name {name!r} must be a plain name (no '/', not '.' or '..'): the run "
                        f"directory is output_dir/run_name; put the path in output_dir")
    out = Path(cfg.output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." and "/" exist
    if not existing.is_dir():
        raise UserError(f"output_dir {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {out}: {existing} is not writable (read-only or no permission)")


# What a run writes in its directory (paths relative to it; wandb/: the wandb tracker's own files); a
# clean start removes only these.
_STAPO_FILES = re.compile(
    r"(\.lock|config\.yaml|\.config\.yaml\.tmp|" + re.escape(HISTORY) + r"|metrics\.jsonl|\.metrics\.jsonl\.tmp|"
    + re.escape(IDS_FILE) + r"|rollouts/step_\d+\.parquet|plots/curves\.png|"
    r"tensorboard/(.+/)?events\.out\.tfevents\.[^/]+|wandb/.+|checkpoints/\.(tmp|old|corrupt)-step_\d+/.+)"
)
_MARKERS = ("config.yaml", HISTORY)  # a folder with neither is not a stapo run


def _foreign_files(run_dir: Path) -> list[str]:
    """Files in ``run_dir`` that stapo did not write (all of them if it is not a stapo run)."""
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if not p.is_dir())
    if not any((run_dir / m).is_file() for m in _MARKERS):
        return [f for f in files if f != LOCK_FILE]
    return [f for f in files if not _STAPO_FILES.fullmatch(f)]


def _clean_start(run_dir: Path) -> None:
    """Remove what an earlier attempt of this run wrote (no checkpoint was saved); nothing else is there."""
    for path in sorted(run_dir.rglob("*"), reverse=True):  # files first, then the folders they emptied
        rel = path.relative_to(run_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # a folder the user made, empty: harmless either way
                path.rmdir()
        elif rel != LOCK_FILE and _STAPO_FILES.fullmatch(rel):
            path.unlink()


@contextlib.contextmanager
def new_run(cfg: TrainConfig, ctx):
    """Create (or clean) ``output_dir/run_name`` and hold its lock; yields the run directory.

    A run directory that already has checkpoints is refused (resume it instead); one whose earlier
    attempt left no checkpoint starts clean; one holding files stapo did not write is refused.
    """
    lock = None

    def open_main() -> Path:
        nonlocal lock
        check_new_run(cfg)
        name = cfg.run_name or f"{cfg.objective.name}-s{cfg.seed}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(cfg.output_dir) / name
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} is a file; choose another run_name")
        if run_dir.is_dir() and not checkpoint_dirs(run_dir) and (foreign := _foreign_files(run_dir)):
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"run directory {run_dir} holds files stapo did not write ({shown}); "
                            "choose another run_name or output_dir, or move them")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"output_dir {cfg.output_dir}: cannot create {run_dir} ({err.strerror})") from None
        lock = RunLock(run_dir).acquire()
        if checkpoint_dirs(run_dir):
            raise UserError(f"run directory {run_dir} already has checkpoints; continue it with "
                            f"`stapo train --resume {run_dir}` or choose another run_name")
        _clean_start(run_dir)  # what a failed earlier attempt with this name left behind
        record_config(run_dir, cfg, 0, None)
        return run_dir

    try:
        yield _on_main(ctx, open_main)
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def resume_run(resume: str | Path, cfg: TrainConfig, ctx):
    """Lock ``resume``, check what ``cfg`` changes, pick the newest intact checkpoint, repair
    ``metrics.jsonl`` to its step and record the config; yields (run directory, checkpoint)."""
    run_dir = Path(resume)
    lock = None

    def open_main() -> Path:
        nonlocal lock
        if not run_dir.is_dir():
            raise UserError(f"--resume {run_dir}: no such run directory")
        lock = RunLock(run_dir).acquire()
        changes = config_changes(run_dir, cfg)
        ckpt = resume_checkpoint(run_dir, warn=_warn)
        step = int(STEP_DIR.match(ckpt.name).group(1))
        _check_steps_left(run_dir, cfg.steps, step)  # before anything is rewritten
        try:
            truncate_metrics(run_dir, step)  # a torn last line goes; steps after the checkpoint are re-run
        except ValueError as err:  # a damaged line before the end: the user decides what to keep
            raise UserError(f"{err}; fix or delete that line, then resume") from None
        record_config(run_dir, cfg, step, changes)
        if changes:
            _warn(f"resuming at step {step} with changes: "
                  + ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items()))
        return ckpt

    try:  # the lock is released however the run ends, a refused start included
        yield run_dir, _on_main(ctx, open_main)
    finally:
        if lock is not None:
            lock.release()


def _check_steps_left(run_dir: Path, steps: int, step: int) -> None:
    more = f"`stapo train --resume {run_dir} steps=M` with M > {step}"
    if steps == step:
        raise RunFinished(f"{run_dir} is at step {step} of {steps}: nothing to train; to continue, {more}")
    if steps < step:
        raise UserError(f"--resume {run_dir}: steps={steps} is at or below the checkpoint's step {step}; "
                        f"nothing changed; to continue, {more}")


def _on_main(ctx, fn):
    """``fn()`` on rank 0, its result (or its user error, of the same class) on every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except UserError as err:
            if ctx.world_size == 1:
                raise
            error = (type(err), str(err))
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error[0](error[1])
    return result


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty mapping adds no key: {} -> {a: 1} is the change a: None -> 1
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(run_dir: Path, cfg: TrainConfig) -> dict[str, dict]:
    """``{key: {"from": saved, "to": new}}`` between ``RUN_DIR/config.yaml`` and ``cfg``; a change to a
    key of ``FROZEN_ON_RESUME`` is refused with the reason."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from ..config import load_yaml

    old, new = _flat(load_yaml(path)), _flat(to_dict(cfg))
    changes = {k: {"from": old.get(k), "to": new.get(k)} for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)}
    for key, c in changes.items():
        frozen = next((f for f in FROZEN_ON_RESUME if key == f or key.startswith(f + ".")), None)
        if frozen:
            raise UserError(f"--resume cannot change {key} ({c['from']!r} -> {c['to']!r}): "
                            f"{FROZEN_ON_RESUME[frozen]}; start a new run for that")
    return changes


def record_config(run_dir: Path, cfg: TrainConfig, step: int, changes: dict | None) -> None:
    """Write ``config.yaml`` (atomically) and append the start (``changes`` None: the whole config) or
    the resume (what changed, from ``step`` on) to the config history."""
    tmp = run_dir / ".config.yaml.tmp"  # headed by the objective line, as `stapo config` prints it
    try:
        tmp.write_text(f"# {objective_line(cfg)}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    except OSError as err:  # a full disk: a failed write() names no file, so name it here
        raise OSError(err.errno, os.strerror(err.errno), str(run_dir / "config.yaml")) from None
    os.replace(tmp, run_dir / "config.yaml")
    entry = {"step": step, "time": datetime.datetime.now().isoformat(timespec="seconds")}
    entry |= {"event": "start", "config": to_dict(cfg)} if changes is None else {"event": "resume", "changes": changes}
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_config_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
