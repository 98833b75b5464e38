"""scripts/gpu_check.sh never rots: its --cpu-smoke runs every section's code at tiny sizes on the CPU,
and a run that cannot finish reports a failure, never a pass (BENCHMARKS.md, "GPU check")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path, *args):
    """Run the script; (process, its JSON report, its markdown)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=_env(), check=False)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, (out / "gpu_check.md").read_text()


def _env():
    import os

    return {**os.environ, "PYTHON": sys.executable}  # the script's python is this venv's


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    proc, report, md = _check(tmp_path, "--cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["status"] == "pass" and report["mode"] == "cpu-smoke"
    s = report["sections"]
    assert {(r["variant"], r["n"]) for r in s["token_stats"]["rows"]} == {("naive", 64), ("stapo", 64)}
    for objective in ("stapo", "justrl"):
        t = s["train"][objective]
        assert len(t["per_step"]) == 3 and t["time/step"] > 0 and t["perf/tokens_per_s"] > 0
        assert t["command"].startswith("stapo train --quiet ") and f"objective.name={objective}" in t["command"]
    assert s["train"]["ratio_stapo_justrl"]["time/step"] > 0
    assert s["eval"]["timing"]["samples"] == 32  # 8 MATH500 problems x 4 samples
    assert s["fsdp2"]["backend"] == "gloo" and len(s["fsdp2"]["per_step"]) == 2
    assert any("torch.distributed.run" in c and "parallel.strategy=fsdp2" in c for c in report["commands"])
    assert "# GPU check: PASS" in md and "## Training steps" in md and "stapo / justrl" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the full check")
def test_without_a_gpu_the_check_fails_loudly(tmp_path):
    proc, report, md = _check(tmp_path)
    assert proc.returncode == 1
    assert report["status"] == "fail" and "no CUDA device" in report["error"]
    assert report["sections"] == {}
    assert md.startswith("# GPU check: FAIL") and "gpu_check: FAIL" in proc.stdout
