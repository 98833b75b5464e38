"""torch.distributed on CPU (gloo): DDP and FSDP2 updates equal the single-process update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers.pairs import workers

HELPER = Path(__file__).parent / "helpers" / "dist_update.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    return env


def _run(cmd, **kw):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


OBJECTIVES = ("stapo", "entropy20")


def _updates(tiny_model_dir, out, strategy: str) -> Path:
    """Every objective's update in one start-up: alone ("none") or as two ranks (OUT/OBJECTIVE)."""
    launch = [sys.executable] if strategy == "none" else TORCHRUN
    _run([*launch, str(HELPER), str(tiny_model_dir), str(out), strategy, ",".join(OBJECTIVES), "2"])
    return out


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    return _updates(tiny_model_dir, tmp_path_factory.mktemp("single"), "none")


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """By strategy, the folder of its two-rank job, run on first use."""
    done = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            done[strategy] = _updates(tiny_model_dir, tmp_path_factory.mktemp(f"two_{strategy}"), strategy)
        return done[strategy]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_ranks_equal_one_process(strategy, objective, single_process, two_ranks, tiny_model_dir):
    got_dir, ref_dir = two_ranks(strategy) / objective, single_process / objective
    ref = load_file(str(ref_dir / "params.safetensors"))
    got = load_file(str(got_dir / "params.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max(float((ref[k] - base[k].double()).abs().max()) for k in ref)
    assert moved > 1e-3, "the reference update did nothing"
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp(min=1e-30))
        assert err < 1e-6, f"{strategy}/{objective}: {k} differs from the single-process update by {err:.2e}"
    # the global thresholds are bitwise identical on both ranks and equal the single-process ones
    t0 = json.loads((got_dir / "thresholds_rank0.json").read_text())
    t1 = json.loads((got_dir / "thresholds_rank1.json").read_text())
    single = json.loads((ref_dir / "thresholds_rank0.json").read_text())
    assert t0 == t1
    assert [float.fromhex(x) for x in t0] == pytest.approx([float.fromhex(x) for x in single], rel=1e-9)


def _train_cmd(model_dir, out, steps, strategy, *extra):
    return [*TORCHRUN, "-m", "stapo", "train", f"model.name_or_path={model_dir}", f"output_dir={out}",
            "run_name=run", f"steps={steps}", "save_every=2", "reward.name=helpers.rewards:digit_reward",
            "reward.num_workers=1", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
            "optim.mini_batch_prompts=2", "optim.micro_batch_size=4", "optim.lr=1e-3", "data.heldout_size=4",
            "threads=1", f"parallel.strategy={strategy}", "--quiet", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_train_and_exact_resume(strategy, tiny_model_dir, tmp_path):
    with ThreadPoolExecutor(max_workers=workers()) as pool:  # the two jobs are independent: side by side
        list(pool.map(_run, [_train_cmd(tiny_model_dir, tmp_path / "a", 4, strategy),
                             _train_cmd(tiny_model_dir, tmp_path / "b", 2, strategy)]))
    resume = [*TORCHRUN, "-m", "stapo", "train", "--resume", str(tmp_path / "b" / "run"), "steps=4", "--quiet"]
    _run(resume)

    def rows(d):
        lines = (d / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "perf/", "reward/seconds"))}
                for x in lines]

    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in a] == [0, 1, 2, 3, 4], "metrics must be written once, by rank 0"
    for ra, rb in zip(a, b):
        if ra["step"] == 2:
            rb = {k: v for k, v in rb.items() if not k.startswith("eval/")}
        assert ra == rb, f"step {ra['step']} differs after a 2-process resume"
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_000004"
    assert (ckpt / "policy" / "model.safetensors").is_file()
    if strategy == "fsdp2":
        assert (ckpt / "dcp").is_dir(), "FSDP2 checkpoints are sharded with torch.distributed.checkpoint"
