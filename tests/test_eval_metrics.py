"""Unit tests of the eval metrics, settings and sample store: hand-worked numbers and brute force."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapo.eval.metrics import (
    benchmark_metrics,
    k_ladder,
    macro_average,
    majority_vote,
    mean_and_stderr,
    pass_at_k,
)
from stapo.eval.samples import append_samples, load_samples
from stapo.eval.settings import EvalSettings, chunk_seed, parse_samples


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(j < c for j in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_overflow_a_float():
    # C(1000, 500) ~ 2.7e299 and C(2000, 1000) overflows float64; the exact integer ratio is the reference
    for n, c, k in [(1000, 5, 500), (2000, 3, 1000), (2000, 1999, 1), (64, 1, 32)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))  # why the naive formula cannot be used


def test_pass_at_1_is_the_fraction_correct_and_bad_input_is_rejected():
    assert pass_at_k(32, 7, 1) == pytest.approx(7 / 32, abs=1e-15)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


@given(st.integers(1, 40), st.data())
def test_pass_at_k_grows_with_k_and_with_c(n, data):
    c = data.draw(st.integers(0, n))
    values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
    if c < n:
        assert all(pass_at_k(n, c, k) <= pass_at_k(n, c + 1, k) + 1e-12 for k in range(1, n + 1))


def test_k_ladder_is_powers_of_two_then_n():
    assert k_ladder(32) == [1, 2, 4, 8, 16, 32]
    assert k_ladder(4) == [1, 2, 4]
    assert k_ladder(6) == [1, 2, 4, 6]
    assert k_ladder(1) == [1]
    with pytest.raises(ValueError):
        k_ladder(0)


def _classes(labels):
    """An equivalence given by class labels, standing in for the verifier: equal labels = equal answers."""
    return lambda a, b: labels[a] == labels[b]


def test_majority_vote_groups_equivalent_answers_not_strings():
    # strings: "3" is the most frequent string (2), but 0.5 == 1/2 == \frac{1}{2} is the larger class (3)
    answers = ["3", "0.5", "3", "1/2", "\\frac{1}{2}"]
    labels = ["three", "half", "three", "half", "half"]
    correct = [False, True, False, True, True]
    assert majority_vote(answers, correct, _classes(labels)) is True
    # with string equality as the relation, the wrong answer "3" would win
    assert majority_vote(answers, correct, lambda a, b: answers[a] == answers[b]) is False


def test_majority_vote_ties_go_to_the_earliest_class_and_none_does_not_vote():
    answers = ["7", None, "8", None, "8", "7"]
    correct = [False, False, True, False, True, False]
    # classes {7: samples 0,5} and {8: samples 2,4} tie at 2; "7" appeared first -> wrong
    assert majority_vote(answers, correct, lambda a, b: answers[a] == answers[b]) is False
    # drop the last "7": the "8" class wins 2 to 1 even though two None samples came first
    assert majority_vote(answers[:5], correct[:5], lambda a, b: answers[a] == answers[b]) is True
    assert majority_vote([None, None], [False, False], lambda a, b: True) is False
    with pytest.raises(ValueError):
        majority_vote(["1"], [True, False], lambda a, b: True)


def test_benchmark_metrics_hand_worked():
    # problem 0: 1 of 4 correct, problem 1: 4 of 4
    correct = [[False, True, False, False], [True, True, True, True]]
    m = benchmark_metrics(correct, {1: [False, True], 2: [False, True], 4: [True, True]})
    assert m["n_samples"] == 4 and m["n_problems"] == 2
    assert m["avg"] == pytest.approx((0.25 + 1.0) / 2)  # 0.625
    # std([0.25, 1], ddof=1) = 0.75 / sqrt(2); divided by sqrt(2 problems) -> 0.375
    assert m["avg_stderr"] == pytest.approx(0.375)
    # pass@2, problem 0: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; problem 1: 1 -> 0.75
    assert m["pass_at_k"] == pytest.approx({"1": 0.625, "2": 0.75, "4": 1.0})
    assert m["pass_at_k"]["1"] == m["avg"]  # avg@N is pass@1
    assert m["maj_at_k"] == {"1": 0.5, "2": 0.5, "4": 1.0}
    with pytest.raises(ValueError, match="same number"):
        benchmark_metrics([[True], [True, False]])


def test_mean_stderr_and_macro_average():
    assert mean_and_stderr([0.5]) == (0.5, 0.0)
    mean, se = mean_and_stderr([0.0, 1.0, 0.5, 0.5])
    assert mean == 0.5 and se == pytest.approx(math.sqrt((0.25 + 0.25) / 3 / 4))
    mac = macro_average({"a": {"avg": 0.2, "avg_stderr": 0.03}, "b": {"avg": 0.4, "avg_stderr": 0.04}})
    assert mac["avg"] == pytest.approx(0.3)
    assert mac["avg_stderr"] == pytest.approx(0.05 / 2)  # sqrt(0.03² + 0.04²) / 2
    assert mac["benchmarks"] == ["a", "b"]


def test_settings_presets_overrides_and_seeds():
    s = EvalSettings()
    assert s.n_samples("aime24") == 32 and s.n_samples("amc23") == 32 and s.n_samples("minerva") == 4
    cfg = s.sampling("aime24", 0)
    assert (cfg.temperature, cfg.top_p, cfg.n) == (0.7, 0.9, 32)
    t = EvalSettings(decoding="train", samples={"aime24": 8}, top_p=0.95)
    cfg = t.sampling("aime24", 3)
    assert (cfg.temperature, cfg.top_p, cfg.n) == (1.0, 0.95, 8)
    assert t.problems_per_chunk("aime24") == 8 and t.problems_per_chunk("math500") == 16
    # seeds: stable numbers, distinct per benchmark and chunk
    assert chunk_seed(0, "aime24", 0) == chunk_seed(0, "aime24", 0)
    assert len({chunk_seed(0, b, c) for b in ("aime24", "math500") for c in range(50)}) == 100
    assert parse_samples("aime24=16, math500=8") == {"aime24": 16, "math500": 8}
    for bad in ["aime24", "aime24=0", "aime24=x"]:
        with pytest.raises(ValueError, match="--samples"):
            parse_samples(bad)
    with pytest.raises(ValueError, match="unknown setting"):
        EvalSettings.from_dict({"temprature": 0.5})
    with pytest.raises(ValueError, match="eval.decoding"):
        EvalSettings(decoding="greedy")
    assert EvalSettings.from_dict({"benchmarks": "aime24, math500"}).benchmarks == ("aime24", "math500")


def _rec(b, i, j):
    return {
        "benchmark": b,
        "problem_index": i,
        "sample_index": j,
        "response": "r",
        "answer": None,
        "correct": False,
        "num_tokens": 1,
    }


def test_sample_store_cuts_a_torn_tail_and_rejects_a_corrupt_middle(tmp_path):
    path = tmp_path / "samples.jsonl"
    assert load_samples(path) == {}
    append_samples(path, [_rec("a", 0, 0), _rec("a", 0, 1)])
    with open(path, "a") as f:
        f.write('{"benchmark": "a", "problem_index": 0, "sam')  # a kill in the middle of a write
    assert set(load_samples(path)) == {("a", 0, 0), ("a", 0, 1)}
    assert path.read_text().endswith("\n")  # repaired: the next append starts on a fresh line
    append_samples(path, [_rec("a", 1, 0)])
    assert set(load_samples(path)) == {("a", 0, 0), ("a", 0, 1), ("a", 1, 0)}
    lines = path.read_text().splitlines()
    lines.insert(1, json.dumps({"benchmark": "a"}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        load_samples(path)
