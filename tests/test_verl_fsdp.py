"""verl's real FSDP2 engine (FSDPEngineWithLMHead, on CPU through a test-only platform plugin) trains
loss_mode=stapo exactly like stapo.policy_loss on the whole mini-batch: alone, with fixed and
token-budget micro-batches, with packed sequences (``use_remove_padding=True``, verl's default), and
sharded over 2 gloo processes (`make test-verl`)."""

from __future__ import annotations

import json
import os
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ranks, remove_padding", [(1, False), (1, True), pytest.param(2, False, marks=pytest.mark.slow)])
def test_fsdp_engine_matches_stapo(tiny_model_dir, ranks, remove_padding):
    """``remove_padding``: verl's default ``use_remove_padding=True`` (packed sequences), as docs/verl.md runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    port = str(_free_port())
    env["MASTER_PORT"] = port
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    proc = subprocess.run([sys.executable, "-W", "ignore", *launcher, str(SCRIPT), str(tiny_model_dir),
                           *(["remove_padding"] if remove_padding else [])], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == (2 if ranks == 1 else 1)  # token budgets only alone (see the script)
    for row in rows:
        assert row["engine"] == "FSDPEngineWithLMHead" and row["ranks"] == ranks
        assert row["remove_padding"] is remove_padding
        assert row["silenced"] > 0  # the mask is active on this batch
        assert row["loss"] == pytest.approx(row["reference_loss"], abs=1e-6), row
        assert row["grad_diff"] < 1e-5, row
