"""Experiment trackers and progress output, for real and offline: every tracker gets the run name and
config at start, the metrics of every step and the checkpoint paths, and each is read back from its
own store (W&B offline run file, trackio's local SQLite store, MLflow's file store, TensorBoard events).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from stapo.config import ConfigError, build_config
from stapo.trainer.logger import RunLogger

ROOT = Path(__file__).resolve().parents[1]
STEPS = {  # what the loop would log: a held-out accuracy at steps 0 and 3 only, a NaN that no tracker gets
    0: {"eval/accuracy": 0.25},
    1: {"reward/mean": 0.5, "actor/entropy": 1.25, "s2t/masked_fraction": 0.01, "train/lr": 1e-3},
    2: {"reward/mean": 0.625, "actor/entropy": 1.5, "s2t/masked_fraction": 0.02, "train/lr": float("nan")},
    3: {"reward/mean": 0.75, "actor/entropy": 1.75, "s2t/masked_fraction": 0.03, "eval/accuracy": 0.5},
}


def run_logger(tmp_path, *overrides, console=None):
    cfg = build_config(None, ["steps=3", "project=stapo-test", *overrides])
    run_dir = tmp_path / f"run-{tmp_path.name}"  # a run name unique to the test (trackio's store is shared)
    run_dir.mkdir()
    with RunLogger(run_dir, cfg, console=console or Console(file=io.StringIO())) as log:
        for step, metrics in STEPS.items():
            log.log(step, metrics)
            if step == 2:
                log.checkpoint(step, run_dir / "checkpoints" / "step_000002")
    return run_dir, cfg


def expected(key):
    return {s: m[key] for s, m in STEPS.items() if key in m and math.isfinite(m[key])}


def read_wandb(run_dir):
    from helpers.wandb_offline import read_offline_run

    run = read_offline_run(run_dir / "wandb")
    history = {key: {row["_step"]: row[key] for row in run["history"] if key in row}
               for key in ("reward/mean", "eval/accuracy", "train/lr", "checkpoint/path")}  # fmt: skip
    assert list(history["checkpoint/path"].values())[-1] == run["summary"]["checkpoint/path"]
    return run["name"], run["config"], history, run["summary"]["checkpoint/path"]


def read_trackio(run_dir):
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("stapo-test", run_dir.name)
    history = {key: {row["step"]: row[key] for row in logs if key in row}
               for key in ("reward/mean", "eval/accuracy", "train/lr")}  # fmt: skip
    config = SQLiteStorage.get_run_config("stapo-test", run_dir.name)
    paths = [row["checkpoint/path"] for row in logs if "checkpoint/path" in row]
    return run_dir.name, config, history, paths[-1]


def read_mlflow(run_dir):
    from mlflow import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("stapo-test").experiment_id])
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("reward/mean", "eval/accuracy", "train/lr")}  # fmt: skip
    params = run.data.params
    config = {"steps": json.loads(params["steps"]), "rollout": {"n": json.loads(params["rollout.n"])}}
    return run.info.run_name, config, history, run.data.tags["checkpoint/path"]


def read_tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    history = {key: {e.step: e.value for e in events.Scalars(key)} if key in tags else {}
               for key in ("reward/mean", "eval/accuracy", "train/lr")}  # fmt: skip

    def text(tag):
        return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]

    config = json.loads(text("config")[0].strip("`\n"))
    return text("run_name")[0], config, history, text("checkpoint")[0]


READERS = {"wandb": read_wandb, "trackio": read_trackio, "mlflow": read_mlflow, "tensorboard": read_tensorboard}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database otherwise
    for key in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("tracker", list(READERS))
def test_tracker_gets_name_config_metrics_and_checkpoints(tracker, tmp_path, offline):
    run_dir, cfg = run_logger(tmp_path, f"logger=[{tracker}]")
    name, config, history, checkpoint = READERS[tracker](run_dir)
    assert name == run_dir.name
    assert config["steps"] == 3 and config["rollout"]["n"] == cfg.rollout.n
    assert history["reward/mean"] == pytest.approx(expected("reward/mean"))
    assert history["eval/accuracy"] == pytest.approx(expected("eval/accuracy"))  # steps 0 and 3
    assert history["train/lr"] == pytest.approx({1: 1e-3})  # the NaN of step 2 is left out
    assert checkpoint == str(run_dir / "checkpoints" / "step_000002")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # the run's own record as ever


def test_mlflow_and_tensorboard_resume_continue_the_same_run(tmp_path, offline):
    from mlflow import MlflowClient

    from stapo.trainer.trackers import start_trackers

    cfg = build_config(None, ["steps=3", "project=stapo-test", "logger=[mlflow,tensorboard]"])
    first = start_trackers(cfg.logger, tmp_path, "run", "stapo-test", {"steps": 3}, 0)
    for step in (1, 2, 3):
        for t in first:
            t.log_metrics(step, {"reward/mean": step / 10})
    for t in first:
        t.close()  # a crash after step 3; the last checkpoint was step 2
    again = start_trackers(cfg.logger, tmp_path, "run", "stapo-test", {"steps": 3}, 2)
    for t in again:
        t.log_metrics(3, {"reward/mean": 0.9})
        t.close()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("stapo-test").experiment_id])
    assert len(runs) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "reward/mean")][-1] == (3, 0.9)
    assert read_tensorboard_scalars(tmp_path)["reward/mean"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.9})


def read_tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_logger_config():
    assert build_config(None, []).logger == ["console"]
    # the pre-`logger` key is gone: an unknown key, named, with `logger` among the allowed ones
    with pytest.raises(ConfigError, match=r"^unknown config key 'tensorboard'; allowed keys here: .*\blogger\b"):
        build_config(None, ["tensorboard=true"])
    with pytest.raises(ConfigError, match=r"config key 'logger': unknown logger 'neptune'; choose from console, wandb"):
        build_config(None, ["logger=[console,neptune]"])


def test_progress_bar_in_a_terminal(tmp_path):
    out = io.StringIO()
    run_logger(tmp_path, console=Console(file=out, force_terminal=True, width=160, color_system=None))
    text = out.getvalue()
    last = [line for line in text.splitlines() if "3/3" in line][-1]  # the bar's final frame
    assert re.search(r"step 3/3 .*ETA .*reward 0\.750  H 1\.750  s2t 3\.00%  eval 0\.500", last), last
    assert "\x1b[?25l" in text  # a live display (cursor hidden while it runs), not printed lines
    assert not re.search(r"\.py:\d+", text)


def test_plain_lines_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    run_logger(tmp_path, console=Console(file=out, force_terminal=False, width=80))
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 0/3  eval 0.250"
    assert re.fullmatch(r"step 1/3  reward 0\.500  H 1\.250  s2t 1\.00%  eval 0\.250  "
                        r"elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d", lines[1])  # fmt: skip
    assert lines[3].startswith("step 3/3  reward 0.750  H 1.750  s2t 3.00%  eval 0.500  elapsed")
    assert len(lines) == 4 and "\x1b" not in out.getvalue()


@pytest.mark.slow
def test_stapo_train_logs_plain_lines_and_reaches_every_tracker(tiny_model_dir, tmp_path, monkeypatch):
    """A real `stapo train` with stdout piped (not a terminal) and all four trackers on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env |= {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "WANDB_MODE": "offline",
            "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}  # fmt: skip
    cmd = [sys.executable, "-m", "stapo", "train", f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}",
           f"run_name=run-{tmp_path.name}", "project=stapo-test", "steps=3", "save_every=2", "eval_every=0",
           "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8", "optim.mini_batch_prompts=2",
           "data.heldout_size=4", "threads=1", "reward.num_workers=1", "reward.name=helpers.rewards:digit_reward",
           "logger=[console,wandb,trackio,mlflow,tensorboard]"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["0/3", "1/3", "2/3", "3/3"], done.stdout
    assert all(" reward " in s and " eta " in s for s in steps[1:])
    assert not re.search(r"\w+\.py:\d+", done.stdout)  # no source-location tags
    assert "Writing model shards" not in done.stdout + done.stderr  # third-party bars are off
    assert "\x1b" not in done.stdout  # plain text (no colour codes, no live display)

    run_dir = tmp_path / f"run-{tmp_path.name}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = {r["step"]: r["reward/mean"] for r in metrics if "reward/mean" in r}
    checkpoints = [str(run_dir / "checkpoints" / f"step_{s:06d}") for s in (2, 3)]
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(key, env[key])
    for reader in READERS.values():
        name, config, history, checkpoint = reader(run_dir)
        assert name == run_dir.name and config["steps"] == 3, reader.__name__
        assert history["reward/mean"] == pytest.approx(rewards), reader.__name__
        assert checkpoint in checkpoints, reader.__name__
