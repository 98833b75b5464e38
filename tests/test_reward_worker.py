"""A user's reward module is imported and checked in a reward worker before the model loads, under a
time limit; a worker's children die with it; a reward's output is captured and capped
(docs/reliability.md, "Round 2: input errors and reward modules"). Real `stapo train` processes on
the tiny model, real modules written to a temporary folder, real child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stapo.rewards import RewardPool
from stapo.rewards.registry import RewardError
from test_reliability import ENV, one_line_error, tiny_args


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def train(folder: Path, *args, timeout=300) -> tuple[subprocess.CompletedProcess, float]:
    """`stapo train ARGS` with ``folder`` importable (the reward modules); (process, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ENV["PYTHONPATH"], str(folder)])}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stapo", "train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)
    return proc, time.monotonic() - t0


def gone(pid: int, within: float = 10.0) -> bool:
    """``pid`` has exited (a zombie left to a container's init counts as exited)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


HOSTILE_IMPORTS = {
    # name: (module source or None for no module, what the one line says)
    "nosuch_mod": (None, "cannot import module 'nosuch_mod': No module named 'nosuch_mod'"),
    "boom_at_import": ("raise RuntimeError('boom at import')\n",
                       "importing module 'boom_at_import' raised RuntimeError: boom at import"),
    "hang_at_import": (("import os, pathlib, time\n"
                       "pathlib.Path(os.environ['PID_FILE']).write_text(str(os.getpid()))\n"
                       "time.sleep(300)\n"),
                       "importing module 'hang_at_import' did not finish within 3 s (import_timeout)"),
}


@pytest.mark.parametrize("module", list(HOSTILE_IMPORTS))
def test_unusable_reward_module_is_one_line_before_the_model_loads(module, tiny_model_dir, tmp_path, monkeypatch):
    source, message = HOSTILE_IMPORTS[module]
    if source is not None:
        write_module(tmp_path, module, source)
    pid_file = tmp_path / "worker.pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    out = tmp_path / "runs"
    args = [a for a in tiny_args(tiny_model_dir, out, "steps=1", "reward.import_timeout=3")
            if not a.startswith("reward.name=")]
    proc, seconds = train(tmp_path, *args, f"reward.name={module}:fn")
    one_line_error(proc, "stapo train: error: reward.name: ", message)
    assert not out.exists(), "a run folder was left for a reward that cannot be used"
    if module == "hang_at_import":
        assert seconds < 60, f"a module hanging at import held the trainer {seconds:.0f} s"
        assert pids_in(pid_file) and all(gone(pid) for pid in pids_in(pid_file)), "the hung worker outlived it"


def test_pool_refuses_a_module_that_hangs_at_import_within_its_limit(tmp_path, monkeypatch):
    write_module(tmp_path, "slow_import", "import time\ntime.sleep(300)\ndef fn(response, gold): return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawn workers get the parent's sys.path
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"'slow_import:fn'.*did not finish within 2 s"):
        RewardPool("slow_import:fn", num_workers=1, import_timeout=2)
    assert time.monotonic() - t0 < 30


def test_pool_names_a_module_that_ends_the_worker_at_import(tmp_path, monkeypatch):
    write_module(tmp_path, "exit_at_import", "import os\nos._exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"'exit_at_import:fn': the reward worker exited while importing its "
                                          r"module \(exit code 3\)"):
        RewardPool("exit_at_import:fn", num_workers=1)


NOISY = """
    import os, subprocess, sys

    started = False

    def reward(response, gold, **kwargs):
        global started
        if not started:  # once per worker: children that would outlive it, and an output flood
            started = True
            kids = [subprocess.Popen(["sleep", "300"]) for _ in range(4)]
            with open(os.environ["PID_FILE"], "a") as f:
                f.write(" ".join(str(k.pid) for k in kids) + " ")
            print("FLOOD-OUT " * 100_000)       # ~1 MB through Python's stdout
            os.write(2, b"FLOOD-ERR " * 100_000)  # ~1 MB straight to fd 2
            sys.stdout.flush()
        return float(response.strip().endswith(str(gold)))
"""


def test_reward_children_die_and_its_output_is_capped_not_streamed(tiny_model_dir, tmp_path, monkeypatch):
    write_module(tmp_path, "noisy_reward", NOISY)
    pid_file = tmp_path / "children.pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    args = [a for a in tiny_args(tiny_model_dir, tmp_path / "runs", "steps=1", "data.heldout=null")
            if not a.startswith("reward.name=")]
    proc, _ = train(tmp_path, *args, "reward.name=noisy_reward:reward", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FLOOD" not in proc.stdout, "a reward's output reached the trainer's stdout"
    assert len(proc.stderr) < 80 * 1024, f"{len(proc.stderr)} bytes of stderr: the output was not capped"
    assert "output past 64 KiB is dropped (reward functions should not print)" in proc.stderr
    assert "bytes of output in all (kept the first 65536)" in proc.stderr
    children = pids_in(pid_file)
    assert len(children) == 4, children
    assert all(gone(pid) for pid in children), "a reward's child processes outlived the run"


def test_a_hung_rewards_children_die_when_the_pool_kills_it(tmp_path, monkeypatch):
    write_module(tmp_path, "forking_spin", """
        import os, subprocess

        def fn(response, gold):
            kid = subprocess.Popen(["sleep", "300"])
            with open(os.environ["PID_FILE"], "a") as f:
                f.write(f"{kid.pid} ")
            sum(range(10**12))  # C-level spin: only the pool's hard kill ends it
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    pid_file = tmp_path / "kids.pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    with RewardPool("forking_spin:fn", num_workers=1, timeout=1.0) as pool:
        assert pool.score_batch(["x"], ["1"]) == [0.0]
        assert pool.stats["reward/worker_restarts"] == 1
        assert pids_in(pid_file) and all(gone(pid) for pid in pids_in(pid_file)), "the child outlived its worker"
