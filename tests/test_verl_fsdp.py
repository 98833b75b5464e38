"""verl's real FSDP2 engine (FSDPEngineWithLMHead, CPU via a test-only platform plugin) trains
loss_mode=stapo exactly like stapo.policy_loss (`make test-verl`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("STAPO_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

pytestmark = pytest.mark.verl
SCRIPT = Path(__file__).parent / "helpers" / "verl_fsdp_cpu.py"


def test_fsdp_engine_matches_stapo(tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env["MASTER_PORT"] = "29647"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), str(tiny_model_dir)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        assert row["engine"] == "FSDPEngineWithLMHead"
        assert row["silenced"] > 0  # the mask is active on this batch
        assert row["loss"] == pytest.approx(row["reference_loss"], abs=1e-6), row
        assert row["grad_diff"] < 1e-5, row
