"""The harness pieces that need the real verifier: maj@k grouping and the in-memory ``evaluate``."""

from __future__ import annotations

import json

import pytest

from stapo.data.problem import Problem
from stapo.eval.harness import aggregate, plan_chunks
from stapo.eval.settings import EvalSettings


def _sample(i, j, answer, correct):
    return {
        "benchmark": "toy",
        "problem_index": i,
        "sample_index": j,
        "response": f"\\boxed{{{answer}}}",
        "answer": answer,
        "correct": correct,
        "num_tokens": 5,
        "finish_reason": "stop",
    }


def test_maj_at_k_groups_answers_with_the_verifier():
    from stapo.rewards import RewardPool

    # problem 0, gold 1/2: the string "3" is the most frequent (2 of 5), but 0.5, \frac{1}{2} and
    # 1/2 are one answer to math-verify (3 of 5), so the majority is right from k = 4 on.
    # problem 1, gold 7: "7.0" and "7" agree; "x" is garbage; None casts no vote.
    answers = [["3", "0.5", "3", "\\frac{1}{2}", "1/2"], ["x", None, "7.0", "7", "8"]]
    correct = [[False, True, False, True, True], [False, False, True, True, False]]
    samples = {
        ("toy", i, j): _sample(i, j, a, c)
        for i in range(2)
        for j, (a, c) in enumerate(zip(answers[i], correct[i]))
    }
    problems = {"toy": [Problem("toy/0", "q", "\\frac{1}{2}", "toy"), Problem("toy/1", "q", "7", "toy")]}
    settings = EvalSettings(benchmarks=("toy",), samples={"toy": 5})
    with RewardPool("math", num_workers=1) as pool:
        assert pool.verify_pairs([("0.5", "\\frac{1}{2}"), ("3", "0.5"), ("7.0", "7")]) == [True, False, True]
        m = aggregate(problems, samples, settings, pool)["benchmarks"]["toy"]
    # k=1: "3" (wrong) | "x" (wrong)                         -> 0/2
    # k=2: "3" vs "0.5" tie -> "3" first (wrong) | "x" alone (wrong) -> 0/2
    # k=4: {3,3} vs {0.5,\frac12} tie -> "3" (wrong) | {7.0, 7} beats {x} (right) -> 1/2
    # k=5: {0.5,\frac12,1/2} = 3 beats {3,3} (right) | {7.0, 7} (right) -> 2/2
    assert m["maj_at_k"] == {"1": 0.0, "2": 0.0, "4": 0.5, "5": 1.0}
    assert m["avg"] == pytest.approx((3 / 5 + 2 / 5) / 2)
    assert m["no_answer_frac"] == pytest.approx(1 / 10)


def test_chunks_are_fixed_problem_groups():
    s = EvalSettings(samples={"aime24": 32}, batch_size=64)
    chunks = plan_chunks("aime24", 5, s)
    assert [c.problems for c in chunks] == [(0, 1), (2, 3), (4,)]
    assert len({s.sampling("aime24", c.index).seed for c in chunks}) == 3
    # a longer problem list (no --limit) keeps the same first chunks, so their samples are reusable
    assert plan_chunks("aime24", 30, s)[:2] == chunks[:2]


def test_evaluate_in_memory_model_as_the_trainer_calls_it(tmp_path):
    from stapo.eval import evaluate_step, step_results
    from stapo.models.tiny import tiny_model_and_tokenizer

    problems = [Problem(f"toy/{i}", f"What is {i} + {i}?", str(2 * i), "toy") for i in range(3)]
    model, tok = tiny_model_and_tokenizer([p.prompt for p in problems] + ["\\boxed{4}"])
    settings = EvalSettings(benchmarks=("toy",), samples={"toy": 2}, max_new_tokens=6, reward_workers=1)
    model.train()  # the trainer's policy is in training mode between steps
    for step in (5, 10):  # every k = 5 steps of a run
        results = evaluate_step(tmp_path, step, model, tok, {"toy": problems}, settings)
        out = tmp_path / "eval" / f"step_{step:06d}"
        assert results == json.loads((out / "results.json").read_text())
        assert results["benchmarks"]["toy"]["n_problems"] == 3
        assert len((out / "samples.jsonl").read_text().splitlines()) == 6
        assert model.training is True  # left as it was found
    assert [s for s, _ in step_results(tmp_path / "eval")] == [5, 10]
    assert (tmp_path / "eval" / "accuracy_vs_step.png").exists()
    assert "| step 5 |" in (tmp_path / "eval" / "steps.md").read_text()
