"""Preemption (docs/reliability.md, round 2): SIGTERM / SIGHUP / SIGINT to a real `stapo train`, to its
PID or its process group, finish the step in flight, save it, print the resume command and exit with
128 + the signal; `--resume` then continues. A second signal aborts at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.pairs import prefetch
from stapo.trainer.checkpoint import checkpoint_dirs, verify_checkpoint
from stapo.trainer.rundir import RunLock
from test_reliability import ENV, steps_of, tiny_args


def start(tiny_model_dir, out, *extra):
    """A long `stapo train` in its own session (process group), as a scheduler starts a job."""
    args = tiny_args(tiny_model_dir, out, "steps=400", "save_every=50", "data.heldout=null", *extra)
    return subprocess.Popen([sys.executable, "-m", "stapo", "train", "--quiet", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop_when(proc, ready, send, seconds: float = 300) -> str:
    """``send()`` once ``ready()`` holds; then the stderr of ``proc`` when it has exited (killed if it hangs)."""
    try:
        deadline = time.monotonic() + seconds
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.01)
        send()
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def at_step(run_dir: Path, step: int):
    return lambda: (run_dir / "metrics.jsonl").is_file() and max(steps_of_safe(run_dir), default=0) >= step


def steps_of_safe(run_dir: Path) -> list[int]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except ValueError:  # the line being written
            pass
    return out


def saved_step(run_dir: Path) -> int:
    return int(checkpoint_dirs(run_dir)[-1].name.split("_")[1])


def resume(run_dir: Path, step: int, cmd=(sys.executable,), env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, "-m", "stapo", "train", "--quiet", "--resume", str(run_dir), f"steps={step + 1}"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def stop_and_resume(tiny_model_dir, out: Path, sig, to_group):
    """Stop a run with ``sig`` at step 2; what it left (the saved step, the steps logged, the checkpoint's
    problems: None if it saved nothing); then resume that step for one more."""
    run_dir = out / "run"
    proc = start(tiny_model_dir, out)
    send = os.killpg if to_group else os.kill  # the group: the reward workers too
    err = stop_when(proc, at_step(run_dir, 2), lambda: send(proc.pid, sig))
    if not checkpoint_dirs(run_dir):
        return proc, err, None, None
    left = saved_step(run_dir), steps_of(run_dir), verify_checkpoint(checkpoint_dirs(run_dir)[-1])
    return proc, err, left, resume(run_dir, left[0])


def second_signal(tiny_model_dir, out: Path) -> tuple[subprocess.Popen, str]:
    proc = start(tiny_model_dir, out)

    def twice():
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)

    return proc, stop_when(proc, at_step(out / "run", 1), twice)


def signal_in_set_up(tiny_model_dir, out: Path) -> tuple[subprocess.Popen, str]:
    proc = start(tiny_model_dir, out)
    lock = out / "run" / ".lock"  # taken before the model loads and the reward workers start: set-up
    return proc, stop_when(proc, lambda: lock.is_file() and lock.read_text().strip(),
                           lambda: os.kill(proc.pid, signal.SIGTERM))


@pytest.fixture(scope="module")
def runs(request, tiny_model_dir, tmp_path_factory):
    """The single-process scenarios of the selected tests, two at a time (helpers/pairs.py); by test name,
    each a future of (its output folder, what the scenario returned)."""

    def scenario_for(item):
        base = item.originalname
        if base not in SCENARIOS:
            return None
        out = tmp_path_factory.mktemp("preempt")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        return lambda: (out, SCENARIOS[base](tiny_model_dir, out, **params))

    pool, futures = prefetch(request, scenario_for)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(("sig", "to_group"), [(signal.SIGTERM, False), (signal.SIGTERM, True),
                                               (signal.SIGHUP, False)])
def test_a_stop_signal_saves_the_step_in_flight_and_resume_continues(runs, request, sig, to_group):
    out, (proc, err, left, resumed) = runs[request.node.name].result()
    run_dir = out / "run"
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert left is not None, f"no checkpoint saved\n{err[-3000:]}"
    step, steps, problems = left
    assert max(steps) == step >= 2  # at most the step in flight is lost: none here, it finished
    assert problems == []
    name = signal.Signals(sig).name
    assert f"{name}: finishing this step" in err
    assert (f"stapo train: interrupted by {name}: checkpoint saved at step {step}; "
            f"continue with `stapo train --resume {run_dir}`") in err
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_of(run_dir) == list(range(step + 2))  # every step once, in order


def test_a_second_signal_aborts_at_once_without_saving(runs, request):
    out, (proc, err) = runs[request.node.name].result()
    run_dir = out / "run"
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM again: aborting now, without saving" in err and "Traceback" not in err, err[-3000:]
    assert not checkpoint_dirs(run_dir)  # save_every=50: nothing was saved
    warnings = []  # the abort unwinds: the lock is released cleanly, not left to the kernel
    RunLock(run_dir).acquire(warn=warnings.append).release()
    assert warnings == []


def test_a_signal_during_set_up_stops_at_once_in_one_line(runs, request):
    out, (proc, err) = runs[request.node.name].result()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGTERM before the first step: stopping, nothing new to save", err
    assert "Traceback" not in err and not checkpoint_dirs(out / "run")


SCENARIOS = {"test_a_stop_signal_saves_the_step_in_flight_and_resume_continues": stop_and_resume,
             "test_a_second_signal_aborts_at_once_without_saving": second_signal,
             "test_a_signal_during_set_up_stops_at_once_in_one_line": signal_in_set_up}


@pytest.mark.slow
def test_torchrun_job_preempted_saves_once_and_resumes(tiny_model_dir, tmp_path):
    """SIGTERM to every process of a 2-rank gloo job, as SLURM delivers it: each rank gets it directly and
    again forwarded by torchrun (whose ranks run in their own sessions). The repeat is not a second signal:
    the ranks agree on one step, rank 0 saves it and says so once; the resumed job's summary prints once."""
    from test_distributed import TORCHRUN, _env

    run_dir = tmp_path / "run"
    args = tiny_args(tiny_model_dir, tmp_path, "steps=400", "save_every=50", "data.heldout=null",
                     "parallel.strategy=ddp")
    env = {**_env(), "PYTHONPATH": ENV["PYTHONPATH"]}
    proc = subprocess.Popen([*TORCHRUN, "-m", "stapo", "train", "--quiet", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def as_slurm_does():
        ranks = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(ranks) == 2, ranks
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.1)  # apart, so that a rank runs its handler twice (at once they would merge), in one step
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun forwards it to each rank

    err = stop_when(proc, at_step(run_dir, 2), as_slurm_does)
    step = saved_step(run_dir)
    assert err.count(f"interrupted by SIGTERM: checkpoint saved at step {step}") == 1, err[-4000:]
    assert "aborting now" not in err and max(steps_of(run_dir)) == step
    assert verify_checkpoint(checkpoint_dirs(run_dir)[-1]) == []
    resumed = resume(run_dir, step, TORCHRUN, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("held-out accuracy (sampled), before RL") == 1, resumed.stdout  # rank 0 only
    assert steps_of(run_dir) == list(range(step + 2))
