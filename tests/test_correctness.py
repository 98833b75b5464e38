"""One definition of a correct sample (``stapo.rewards.is_correct``) behind held-out accuracy in training
and ``stapo eval``'s samples: a user's reward that gives partial credit counts as correct in neither."""

from __future__ import annotations

import pytest

from stapo.config.train import RolloutConfig
from stapo.demo.task import make_problems
from stapo.eval.harness import encode_prompt, plan_chunks, run_chunk
from stapo.eval.settings import EvalSettings
from stapo.models.loading import load_causal_lm, load_tokenizer
from stapo.rewards import RewardPool, is_correct
from stapo.rollout import HFGenerator
from stapo.trainer.heldout import heldout_accuracy

REWARDS = "def full(response, gold, **_):\n    return 1.0\n\ndef partial(response, gold, **_):\n    return 0.75\n"


def test_is_correct_is_full_marks():
    assert is_correct(1.0) and not is_correct(0.75) and not is_correct(0.0) and not is_correct(-1.0)
    assert type(is_correct(1.0)) is bool  # written to samples.jsonl as is


@pytest.mark.parametrize(("reward", "correct"), [("full", True), ("partial", False)])
def test_heldout_accuracy_and_eval_samples_agree(reward, correct, tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "credit.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawn workers get the parent's sys.path
    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    generator = HFGenerator(model.eval(), tok, batch_size=8)
    problems = make_problems(2, seed=0, split="heldout")
    settings = EvalSettings(benchmarks=["demo"], samples={"demo": 2}, max_new_tokens=4, batch_size=4)
    prompts = {i: encode_prompt(p, tok, settings) for i, p in enumerate(problems)}
    with RewardPool(f"credit:{reward}", num_workers=1) as pool:
        records = [r for c in plan_chunks("demo", len(problems), settings)
                   for r in run_chunk(c, problems, prompts, generator, pool, settings)]
        held = heldout_accuracy(generator, tok, pool, problems, [prompts[i][0] for i in range(len(problems))],
                                RolloutConfig(max_new_tokens=4), samples=2, seed=0)
    assert [r["correct"] for r in records] == [correct] * 4
    assert held["eval/accuracy"] == held["eval/greedy_accuracy"] == float(correct)
