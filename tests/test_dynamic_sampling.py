"""DAPO dynamic sampling (`rollout.dynamic_sampling`) on a tiny real model with HF generation.

The generator is the real ``HFGenerator`` with a colocated engine's rule added: ``generate`` refuses
while asleep. Every response it samples is recorded, so the test recomputes each group's rewards with
the reward function itself and checks what the trainer dropped, refilled, trained on and logged.
"""

from __future__ import annotations

import json
import re
from itertools import islice

import pytest

from helpers.rewards import parity_reward
from stapo.config import build_config
from stapo.diagnostics.dumps import read_rollouts
from stapo.rollout import HFGenerator, SamplingConfig
from stapo.trainer import loop

P, G = 4, 4


class AwakeOnlyHF(HFGenerator):
    """``HFGenerator`` that, like vLLM in sleep mode, cannot generate between ``sleep()`` and ``wake_up()``.
    ``calls`` logs each call; ``sampled`` holds (prompt text, response texts) of every prompt generated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asleep, self.calls, self.sampled = False, [], []

    def generate(self, prompts, sampling):
        if self.asleep:
            raise RuntimeError("generate() on a sleeping engine")
        out = super().generate(prompts, sampling)
        self.calls.append("generate")
        self.sampled += [(self.tokenizer.decode(p), [g.text for g in gens]) for p, gens in zip(prompts, out)]
        return out

    def sleep(self):
        self.asleep = True
        self.calls.append("sleep")

    def wake_up(self):
        self.asleep = False
        self.calls.append("wake_up")


@pytest.fixture
def generators(monkeypatch):
    made = []

    def build(cfg, model, tokenizer, ctx):
        made.append(AwakeOnlyHF(model, tokenizer, batch_size=cfg.rollout.generation_batch_size))
        return made[-1]

    monkeypatch.setattr(loop, "training_generator", build)  # the trainer's own factory, one backend swapped
    return made


def run(model_dir, tmp_path, rounds: int):
    cfg = build_config(None, [
        f"model.name_or_path={model_dir}", f"output_dir={tmp_path}", "run_name=run", "steps=3",
        "reward.name=helpers.rewards:parity_reward", "reward.num_workers=1", f"rollout.prompts_per_step={P}",
        f"rollout.n={G}", "rollout.max_new_tokens=8", "rollout.dynamic_sampling=true",
        f"rollout.max_refill_rounds={rounds}", "optim.mini_batch_prompts=2", "optim.micro_batch_size=8",
        "optim.lr=1e-3", "data.heldout=null", "diagnostics.dump_every=1", "save_every=100", "threads=1",
    ])
    run_dir = loop.train(cfg, quiet=True)
    return run_dir, [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


def rewards_of(prompt: str, texts: list[str]) -> list[float]:
    gold = str(eval(re.search(r"Compute ([\d +-]+)\.", prompt).group(1)))  # the demo task's arithmetic
    return [parity_reward(None, t, gold) for t in texts]


def steps_of(calls: list[str]) -> list[int]:
    """Generate calls per step; within a step every generate precedes the one sleep, and wake_up ends it."""
    text = " ".join(calls)
    assert re.fullmatch(r"(generate( generate)* sleep wake_up ?)+", text), text
    return [chunk.count("generate") for chunk in text.split("wake_up") if chunk.strip()]


def informative(groups) -> list:
    return [g for g in groups if len(set(g[1])) > 1]


def test_a_sleeping_generator_refuses_to_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gen = AwakeOnlyHF(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok)
    prompt, sampling = [tok("Compute 1 + 2.")["input_ids"]], SamplingConfig(max_new_tokens=2)
    gen.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        gen.generate(prompt, sampling)
    gen.wake_up()
    assert len(gen.generate(prompt, sampling)[0]) == 1


@pytest.mark.parametrize("rounds", [3, 0])
def test_dynamic_sampling_drops_all_equal_groups_and_refills_while_awake(rounds, tiny_model_dir, tmp_path,
                                                                        generators, one_torch_thread):
    run_dir, metrics = run(tiny_model_dir, tmp_path, rounds)  # the old order (refill after sleep) raised here
    (gen,) = generators
    per_step = steps_of(gen.calls)
    assert len(per_step) == len(metrics) == 3
    recorded = iter(gen.sampled)
    total = 0
    for step, (calls, m) in enumerate(zip(per_step, metrics), start=1):
        groups = [(prompt, rewards_of(prompt, texts)) for prompt, texts in islice(recorded, P * calls)]
        flat = [r for _, rs in groups for r in rs]
        # refills run until P informative groups are in, or the rounds are spent
        assert calls == 1 + m["rollout/refill_rounds"] <= 1 + rounds
        assert calls == 1 or len(informative(groups[: P * (calls - 1)])) < P
        assert len(informative(groups)) >= P or calls == 1 + rounds
        # the metrics cover every sampled response, refills included
        total += len(flat)
        assert m["train/rollouts"] == total and m["reward/items"] == len(flat)
        assert m["reward/mean"] == pytest.approx(sum(flat) / len(flat))
        assert m["rollout/constant_groups"] == pytest.approx(1 - len(informative(groups)) / len(groups))
        # trained on: the first P informative groups, topped up with the first round's all-equal ones
        first_constant = [g for g in groups[:P] if g not in informative(groups[:P])]
        expected = (informative(groups) + first_constant)[:P]
        table = read_rollouts(run_dir / "rollouts" / f"step_{step:06d}.parquet").to_pydict()
        rows = {}
        for seq, group, prompt, reward in zip(table["seq"], table["group"], table["prompt"], table["reward"]):
            assert group == seq // G  # one id per trained group, whichever round sampled it
            rows[seq] = (prompt, reward)
        assert sorted(rows) == list(range(P * G))
        trained = [(rows[g * G][0], [rows[g * G + i][1] for i in range(G)]) for g in range(P)]
        assert all(rows[g * G + i][0] == trained[g][0] for g in range(P) for i in range(G))
        assert trained == expected
    if rounds:
        assert sum(m["rollout/refill_rounds"] for m in metrics) > 0, "no step refilled: the run proves nothing"
    else:
        assert any(len(set(rs)) == 1 for _, rs in trained), "no all-equal group was topped up"
