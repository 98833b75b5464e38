"""Faults a user meets (docs/reliability.md): two writers, resume overrides, torn metrics, corrupt
checkpoints, bad config and data, invalid rewards. Real runs of the tiny model, real files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stapo.cli import main
from stapo.config import ConfigError, build_config
from stapo.errors import UserError
from stapo.trainer.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    resume_checkpoint,
    verify_checkpoint,
)
from stapo.trainer.loop import train
from stapo.trainer.rundir import RunLock, RunLockedError, read_config_history

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}


def tiny_args(model_dir, out_dir, *extra):
    return [f"model.name_or_path={model_dir}", f"output_dir={out_dir}", "run_name=run",
            "reward.name=helpers.rewards:digit_reward", "reward.num_workers=1",
            "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
            "optim.mini_batch_prompts=2", "optim.micro_batch_size=8", "optim.lr=1e-3",
            "data.heldout_size=4", "eval_every=0", "save_every=100", "threads=1", *extra]


def steps_of(run_dir):
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def stapo(*args, **kw):
    return subprocess.run([sys.executable, "-m", "stapo", *map(str, args)], capture_output=True, text=True,
                          env=ENV, check=False, **kw)


def one_line_error(proc, *fragments):
    """Exit status 2, one line on stderr naming every fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2; tests copy it before touching it."""
    cfg = build_config(None, tiny_args(tiny_model_dir, tmp_path_factory.mktemp("base"),
                                       "steps=2", "save_every=1", "keep_last=3", "data.heldout=null"))
    return cfg, train(cfg, quiet=True)


@pytest.fixture
def run_copy(base_run, tmp_path):
    cfg, run_dir = base_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return cfg, copy


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle: same size, different content
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])


# --- checkpoint integrity -----------------------------------------------------------------------

def test_manifest_holds_size_and_sha256_of_every_file(base_run):
    _, run_dir = base_run
    ckpt = checkpoint_dirs(run_dir)[-1]
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert sorted([*files, "manifest.json"]) == on_disk
    assert {"policy/model.safetensors", "trainer_state/state.json", "trainer_state/tensors.safetensors"} <= set(files)
    assert all(files[f]["size"] == (ckpt / f).stat().st_size and len(files[f]["sha256"]) == 64 for f in files)
    assert verify_checkpoint(ckpt) == []


@pytest.mark.parametrize("name", ["policy/model.safetensors", "trainer_state/state.json"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(run_copy, name, how):
    _, run_dir = run_copy
    corrupt(run_dir / "checkpoints" / "step_000002" / name, how)
    warnings = []
    ckpt = resume_checkpoint(run_dir, warn=warnings.append)
    assert ckpt.name == "step_000001"
    expected = "checksum mismatch" if how == "flip" else "bytes, expected"
    assert len(warnings) == 1 and name in warnings[0] and expected in warnings[0], warnings
    assert "step_000002 is corrupt" in warnings[0] and "resuming from step_000001" in warnings[0]
    # moved aside: pruning and the next resume never pick it again
    assert checkpoint_dirs(run_dir) == [ckpt] and (run_dir / "checkpoints" / ".corrupt-step_000002").is_dir()


def test_no_checkpoint_or_no_intact_one_is_one_clear_error(run_copy):
    _, run_dir = run_copy
    for step in ("step_000001", "step_000002"):
        corrupt(run_dir / "checkpoints" / step / "policy" / "model.safetensors", "flip")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint \(step_000002: policy/model.safetensors"):
        resume_checkpoint(run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint under .*checkpoints"):
        resume_checkpoint(run_dir)


def test_resume_past_a_flipped_checkpoint_with_a_torn_metrics_line(run_copy):
    cfg, run_dir = run_copy
    corrupt(run_dir / "checkpoints" / "step_000002" / "policy" / "model.safetensors", "flip")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # a write torn by a kill
    from stapo.trainer.plots import plot_run

    assert plot_run(run_dir).is_file()  # `stapo plot` skips the torn line
    train(dataclasses.replace(cfg, steps=3), resume=run_dir, quiet=True)
    assert steps_of(run_dir) == [0, 1, 2, 3]  # torn tail dropped, step 2 (after the used checkpoint) re-run
    assert [p.name for p in checkpoint_dirs(run_dir)][-1] == "step_000003"
    assert verify_checkpoint(checkpoint_dirs(run_dir)[-1]) == []


# --- resume semantics ---------------------------------------------------------------------------

def test_resume_applies_lr_and_weight_decay_and_records_them(run_copy):
    cfg, run_dir = run_copy
    optim = dataclasses.replace(cfg.optim, lr=1e-2, weight_decay=0.1)
    train(dataclasses.replace(cfg, steps=3, optim=optim), resume=run_dir, quiet=True)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["train/lr"] == pytest.approx(1e-2)
    state = json.loads((run_dir / "checkpoints" / "step_000003" / "trainer_state" / "state.json").read_text())
    groups = state["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(1e-2) and g["weight_decay"] == 0.1 for g in groups)
    assert state["scheduler"]["base_lrs"] == [pytest.approx(1e-2)] * len(groups)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-2 and saved["steps"] == 3
    history = read_config_history(run_dir)
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", 2)]
    assert history[1]["changes"] == {"optim.lr": {"from": 1e-3, "to": 1e-2},
                                     "optim.weight_decay": {"from": 0.0, "to": 0.1},
                                     "steps": {"from": 2, "to": 3}}


@pytest.mark.parametrize("override", ["rollout.n=2", "seed=1", "model.lora.r=4", "data.shuffle=false"])
def test_resume_refuses_changes_that_break_the_run(run_copy, tiny_model_dir, override):
    cfg, run_dir = run_copy
    before = (run_dir / "config.yaml").read_text()
    changed = build_config(None, tiny_args(tiny_model_dir, cfg.output_dir, "steps=2", "save_every=1",
                                           "keep_last=3", "data.heldout=null", override))
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"--resume cannot change {re.escape(key)} "):
        train(changed, resume=run_dir, quiet=True)
    assert (run_dir / "config.yaml").read_text() == before and len(read_config_history(run_dir)) == 1


def test_rerun_of_a_run_that_left_no_checkpoint_starts_clean(run_copy):
    cfg, run_dir = run_copy
    shutil.rmtree(run_dir / "checkpoints")  # the first attempt died before its first save
    train(dataclasses.replace(cfg, output_dir=str(run_dir.parent), steps=1), quiet=True)
    assert steps_of(run_dir) == [0, 1]
    assert [h["event"] for h in read_config_history(run_dir)] == ["start"]


# --- one writer per run directory ---------------------------------------------------------------

def wait_for(condition, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_lock_names_a_live_holder_and_is_taken_over_from_a_dead_one(tmp_path):
    script = (f"import time; from stapo.trainer.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
              "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by another stapo process \(PID {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    warnings = []
    lock = RunLock(tmp_path).acquire(warn=warnings.append)
    assert len(warnings) == 1 and f"PID {holder.pid}, which ended without releasing it" in warnings[0]
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    RunLock(tmp_path).acquire(warn=warnings.append).release()  # a clean release leaves nothing stale
    assert len(warnings) == 1


def test_two_processes_on_one_run_name(tiny_model_dir, tmp_path, capsys):
    """A real race: a second `stapo train` (and a `--resume`) on a running run are refused naming its PID;
    after the first is killed (-9), `--resume` takes the stale lock over and the record stays clean."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_model_dir, tmp_path, "steps=1000", "save_every=1", "data.heldout=null")
    first = subprocess.Popen([sys.executable, "-m", "stapo", "train", "--quiet", *args], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / ".lock").is_file() and (run_dir / ".lock").read_text().strip(), first)
        second = subprocess.Popen([sys.executable, "-m", "stapo", "train", *args, "optim.lr=1e-2"], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        resumed = main(["train", "--resume", str(run_dir), "steps=1000"])  # in this process, meanwhile
        resumed_err = capsys.readouterr().err
        _, second_err = second.communicate(timeout=120)
        wait_for(lambda: checkpoint_dirs(run_dir), first)
    finally:
        first.kill()
        first.wait()
    refused = f"is in use by another stapo process (PID {first.pid})"
    one_line_error(subprocess.CompletedProcess([], second.returncode, "", second_err), refused)
    one_line_error(subprocess.CompletedProcess([], resumed, "", resumed_err), refused)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-3  # the first's config
    saved = int(checkpoint_dirs(run_dir)[-1].name.split("_")[1])
    assert main(["train", "--resume", str(run_dir), "--quiet", f"steps={saved + 1}"]) == 0
    assert f"last locked by PID {first.pid}, which ended without releasing it" in capsys.readouterr().err
    assert steps_of(run_dir) == list(range(saved + 2))  # one writer: every step once, in order


# --- validation up front ------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("save_every=0", "'save_every' must be >= 1; got 0"),
    ("optim.mini_batch_prompts=0", "'optim.mini_batch_prompts' must be >= 1; got 0"),
    ("optim.lr=-1e-3", "'optim.lr' must be > 0; got -0.001"),
    ("optim.lr=nan", "'optim.lr' must be > 0; got nan"),
    ("steps=-3", "'steps' must be >= 1; got -3"),
    ("rollout.prompts_per_step=0", "'rollout.prompts_per_step' must be >= 1; got 0"),
    ("optim.micro_batch_size=0", "'optim.micro_batch_size' must be >= 1; got 0"),
    ("rollout.top_p=1.5", "'rollout.top_p' must be > 0 and <= 1; got 1.5"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas' must be two numbers in [0, 1)"),
    ("reward.timeout=0", "'reward.timeout' must be > 0; got 0.0"),
])
def test_numeric_ranges_are_checked_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(None, [override])


def test_empty_and_non_utf8_yaml_name_the_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty: give config keys, or omit the file"):
        build_config(str(empty))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 13\)"):
        build_config(str(latin1))


def test_user_errors_exit_2_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    one_line_error(stapo("train", "save_every=0"), "stapo train: error:", "'save_every' must be >= 1")
    with pytest.raises(ConfigError, match="save_every"):  # --debug: the exception and its traceback
        main(["--debug", "train", "save_every=0"])
    for argv, fragment in ((["train", "--resume", str(tmp_path / "nope")], "no such run directory"),
                           (["plot", str(tmp_path / "nope")], "metrics.jsonl not found"),
                           (["train", str(tmp_path / "nope.yaml")], "config file not found")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        one_line_error(subprocess.CompletedProcess([], 2, "", err), f"stapo {argv[0]}: error:", fragment)


def test_data_errors_come_before_the_model_and_leave_no_run_folder(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?"}\n')
    out = tmp_path / "runs"
    line = one_line_error(stapo("train", *tiny_args(tiny_model_dir, out, f"data.train={bad}")), "bad.jsonl")
    assert "row 1" in line and "'answer'" in line
    assert main(["train", *tiny_args(tiny_model_dir, out, f"data.train={tmp_path / 'missing.jsonl'}")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists(), "a run folder was created for invalid input"


def test_prompt_longer_than_the_model_positions_is_refused_before_training(tiny_model_dir, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "1 + 1 = ? " * 200, "answer": "2", "id": "long-one"}) + "\n"
                    + json.dumps({"problem": "2 + 2?", "answer": "4"}) + "\n")
    cfg = build_config(None, tiny_args(tiny_model_dir, tmp_path / "runs", f"data.train={long}", "data.heldout=null"))
    with pytest.raises(UserError, match=r"data.train: problem '.*' has a \d+-token prompt, which with "
                                        r"rollout.max_new_tokens=8 exceeds the model's 512 positions"):
        train(cfg, quiet=True)
    assert not (tmp_path / "runs").exists()


# --- rewards ------------------------------------------------------------------------------------

def test_nan_and_non_numeric_rewards_are_counted_and_warned_about():
    from stapo.rewards import RewardPool

    responses = ["7", "nan", "inf", "text", "none", "list", "8"]
    with RewardPool("fixtures.user_rewards:unreliable_reward", num_workers=1) as pool:
        with pytest.warns(RuntimeWarning, match=r"unreliable_reward'?: 5 of 7 items returned no valid number "
                                                r"\(item 1 returned nan\)"):
            scores = pool.score_batch(responses, ["7"] * 7)
        assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        assert pool.last_item_status == ["ok", "invalid", "invalid", "invalid", "invalid", "invalid", "ok"]
        metrics = pool.pop_metrics()
        assert metrics["reward/invalid"] == 5 and metrics["reward/errors"] == 0


def test_nan_reward_in_a_train_step_is_logged_not_dropped(tiny_model_dir, tmp_path):
    cfg = build_config(None, tiny_args(tiny_model_dir, tmp_path, "steps=1", "data.heldout=null",
                                       "reward.name=helpers.rewards:nan_reward", "rollout.max_new_tokens=12"))
    with pytest.warns(RuntimeWarning, match="nan_reward.*returned nan"):
        run_dir = train(cfg, quiet=True)
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["reward/invalid"] > 0 and row["reward/mean"] is not None
    assert row["train/optimizer_steps"] == 2 and row["train/nonfinite_skipped"] == 0
