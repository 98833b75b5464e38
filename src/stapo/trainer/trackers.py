"""Experiment trackers behind one interface: the run name and config at start, scalar metrics every
step, checkpoint paths as they are written.

Chosen with ``logger: [console, wandb, trackio, mlflow, tensorboard]`` (any subset); each tracker is an
optional extra (``pip install 'stapo[wandb]'``) imported only when chosen. Where each one writes:

- wandb: ``WANDB_*`` as usual (``WANDB_MODE=offline`` keeps it local); files under ``RUN_DIR/wandb``.
- trackio: its local store (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``) or a Space.
- mlflow: ``$MLFLOW_TRACKING_URI`` (a server, ``sqlite:///...``; default ``sqlite:///mlflow.db``).
- tensorboard: ``RUN_DIR/tensorboard``.

A resumed run continues the same tracker run: the ids are kept in ``RUN_DIR/trackers.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
from pathlib import Path
from typing import Any

TRACKERS = ("wandb", "trackio", "mlflow", "tensorboard")
LOGGERS = ("console", *TRACKERS)
_MODULES = {"wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow", "tensorboard": "tensorboard"}
IDS_FILE = "trackers.json"


def missing_tracker(names) -> str | None:
    """A one-line error for the first unknown or uninstalled logger in ``names``, else None."""
    for name in names:
        if name not in LOGGERS:
            return f"config key 'logger': unknown logger {name!r}; choose from {', '.join(LOGGERS)}"
        if name in _MODULES and importlib.util.find_spec(_MODULES[name]) is None:
            return f"config key 'logger': {name} is not installed: pip install 'stapo[{name}]'"
    return None


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among ``metrics`` (what every tracker can plot)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for trackers whose parameters are flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """One experiment tracker, built as ``Cls(run_dir, run_name, project, config, start_step, resume_id)``:
    it starts (or, with ``resume_id``, the id its ``run_id`` gave in an earlier session of the same
    run, continues) a tracker run and sends it the run name and ``config``."""

    name = ""

    @property
    def run_id(self) -> str | None:
        return None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def log_checkpoint(self, step: int, path: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir, run_name, project, config, start_step, resume_id):
        import wandb

        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", project), name=run_name, config=config, dir=str(run_dir),
            id=resume_id, resume="allow" if resume_id else None,
            settings=wandb.Settings(console="off", silent=True),  # stapo prints its own progress
        )  # fmt: skip

    @property
    def run_id(self):
        return self._run.id

    def log_metrics(self, step, metrics):
        self._run.log(metrics, step=step)

    def log_checkpoint(self, step, path):
        self._run.log({"checkpoint/path": path}, step=step)  # every path, in the history of its step
        self._run.summary.update({"checkpoint/path": path, "checkpoint/step": step})  # the latest

    def close(self):
        self._run.finish()


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, run_dir, run_name, project, config, start_step, resume_id):
        import trackio

        self._trackio = trackio
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would break into stapo's progress lines
            self._run = trackio.init(project=project, name=run_name, config=config,
                                     resume="allow" if start_step else "never", embed=False)  # fmt: skip

    def log_metrics(self, step, metrics):
        self._run.log(metrics, step=step)

    def log_checkpoint(self, step, path):
        self._run.log({"checkpoint/path": path}, step=step)  # trackio keeps any JSON value per step

    def close(self):
        with contextlib.redirect_stdout(io.StringIO()):
            self._run.finish()
        self._trackio.context_vars.current_run.set(None)  # else its exit hook finishes (and prints) again


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir, run_name, project, config, start_step, resume_id):
        import mlflow

        self._client = mlflow.MlflowClient()
        if resume_id:
            self._id = resume_id
            self._client.update_run(resume_id, status="RUNNING")
            return
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=run_name, tags={"stapo.run_dir": str(run_dir)})
        self._id = run.info.run_id
        params = [mlflow.entities.Param(k, json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in flatten(config).items()]  # fmt: skip
        for i in range(0, len(params), 100):  # the store's batch limit
            self._client.log_batch(self._id, params=params[i : i + 100])

    @property
    def run_id(self):
        return self._id

    def log_metrics(self, step, metrics):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self._id, metrics=items[i : i + 1000])

    def log_checkpoint(self, step, path):
        self._client.set_tag(self._id, "checkpoint/path", path)
        self._client.set_tag(self._id, "checkpoint/step", str(step))

    def close(self):
        self._client.set_terminated(self._id)


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir, run_name, project, config, start_step, resume_id):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run re-logs the steps after its checkpoint: drop the old events for those steps
        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self._writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
            self._writer.add_text("run_name", run_name, 0)

    def log_metrics(self, step, metrics):
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def log_checkpoint(self, step, path):
        self._writer.add_text("checkpoint", path, step)

    def close(self):
        self._writer.close()


TRACKER_CLASSES: dict[str, type[Tracker]] = {
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
    "mlflow": MlflowTracker,
    "tensorboard": TensorBoardTracker,
}


def start_trackers(names, run_dir: Path, run_name: str, project: str, config: dict,
                   start_step: int) -> list[Tracker]:  # fmt: skip
    """Start the chosen trackers (console is not one); ids for a later resume go to ``trackers.json``."""
    ids_path = Path(run_dir) / IDS_FILE
    ids = json.loads(ids_path.read_text()) if start_step and ids_path.is_file() else {}
    trackers = [
        TRACKER_CLASSES[n](Path(run_dir), run_name, project, config, start_step, ids.get(n))
        for n in names
        if n in TRACKER_CLASSES
    ]
    ids |= {t.name: t.run_id for t in trackers if t.run_id}
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return trackers
