"""A real 2-process run: ``accelerate launch`` starts 2 CPU processes (gloo) that train STAPOTrainer for 2 steps.

Launcher: accelerate 1.15's ``--cpu --num_processes 2`` starts *one* process unless mpirun and a
hostfile are given (``simple_launcher``); ``--multi_gpu --num_processes 2`` starts two through
torchrun, and ``use_cpu=True`` in the config makes each of them a gloo CPU rank (MULTI_CPU). The
test asserts the world size is 2.

τ_h must be identical on both ranks and equal the quantile of the candidates gathered from both
ranks and both accumulation micro-batches of each step; the loss denominator is the kept tokens of
the whole step on both ranks.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
P_THRESHOLD = 0.02  # trl_common.HIGH_PROB_THRESHOLD, repeated so this file reads on its own
Q = 0.75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _candidate_entropies(stats: dict) -> torch.Tensor:
    """Written out by hand: valid tokens with A > 0 and p < τ_p."""
    adv = stats["advantages"].unsqueeze(1)  # [B, 1]
    cand = stats["response_mask"].bool() & (adv > 0) & (stats["logprobs"].double().exp() < P_THRESHOLD)
    return stats["entropy"].double()[cand]


@pytest.mark.slow
def test_two_processes_share_the_threshold_of_the_gathered_step(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(HERE / "trl_multiproc_script.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [[p["step"] for p in r["plans"]] for r in ranks] == [[0, 2], [0, 2]]  # once per optimizer step

    local_differs = False
    for plan0, plan1 in zip(ranks[0]["plans"], ranks[1]["plans"]):
        assert len(plan0["stats"]) == len(plan1["stats"]) == 2  # both accumulation micro-batches
        assert plan0["threshold"] == plan1["threshold"]  # identical on both ranks, bit for bit
        gathered = torch.cat([_candidate_entropies(s) for p in (plan0, plan1) for s in p["stats"]])
        assert gathered.numel() > 1
        assert plan0["threshold"] == float(torch.quantile(gathered, Q))
        for plan in (plan0, plan1):
            local = torch.cat([_candidate_entropies(s) for s in plan["stats"]])
            local_differs |= local.numel() > 0 and float(torch.quantile(local, Q)) != plan["threshold"]
            # the masks each rank applied use the shared τ_h
            for s, silenced in zip(plan["stats"], plan["silenced"]):
                adv = s["advantages"].unsqueeze(1)
                expect = (s["response_mask"].bool() & (adv > 0) & (s["logprobs"].double().exp() < P_THRESHOLD)
                          & (s["entropy"].double() < plan["threshold"]))
                assert torch.equal(silenced, expect)
        # counts and the dapo denominator are global: the kept tokens of the step on both ranks
        assert plan0["counts"] == plan1["counts"]
        kept = sum(int((s["response_mask"].bool() & ~m).sum()) for p in (plan0, plan1)
                   for s, m in zip(p["stats"], p["silenced"]))
        assert plan0["num_items_in_batch"] == plan1["num_items_in_batch"] == kept
        assert plan0["counts"][2] > 0  # S2T silenced something
    assert local_differs  # each rank alone would have chosen another τ_h: the gather matters

    # TRL's own logging reports the shared threshold on the main process
    logs = [h for h in ranks[0]["log_history"] if "loss" in h]
    assert [h["s2t/entropy_threshold"] for h in logs] == [p["threshold"] for p in ranks[0]["plans"]]
