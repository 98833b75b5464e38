"""Reward building blocks that run in the caller's process: extraction, DAPO verifier, terms, adapters.

No worker pool here (see test_rewards_pool.py / test_rewards_user.py); everything is pure Python.
"""

import time

import pytest

from stapo.rewards import (
    OverlongConfig,
    all_boxed,
    dapo_reward,
    extract_answer,
    format_term,
    last_boxed,
    normalize_answer,
    overlong_penalty,
    resolve_reward,
    split_top_level,
)
from stapo.rewards.extract import answer_parts, strip_dollars
from stapo.rewards.math_reward import final_answer, parse_keys
from stapo.rewards.registry import TrlAdapter, VerlAdapter, detect_signature


# ---- extraction ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last one wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{\\}}", "\\}"),
        ("\\boxed {7}", "7"),  # space before the brace
        ("\\boxed 5 apples", "5"),  # brace-less form some models write
        ("\\fbox{3}", "3"),
        ("\\boxed{}", ""),
        ("no box", None),
        ("\\boxed{1} and \\boxed{2", None),  # the last box never closes: no answer
        ("\\boxedx{3}", None),  # a different macro
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_answer_strict_and_fallback():
    assert extract_answer("The answer is \\boxed{27}") == "27"
    # no box: math-verify's own patterns; strict mode refuses
    assert extract_answer("We get $x = 3$. The final answer is $\\frac{1}{2}$") == "\\frac{1}{2}"
    assert extract_answer("We get $x = 3$. The final answer is $\\frac{1}{2}$", strict=True) is None
    assert extract_answer("so the total is 1,234 apples") == "1234"
    assert extract_answer("I think 5, then 7") == "7"  # last number, as math-verify picks
    # an empty or unbalanced box is an answer of nothing, not a reason to look elsewhere
    assert extract_answer("it is 5 \\boxed{}") is None
    assert extract_answer("it is 5 \\boxed{ {") is None
    assert extract_answer("nothing here") is None


def test_extraction_is_linear_on_hostile_text():
    hostile = [
        "\\boxed{" + "{" * 5000 + "}" * 5000 + "}",
        "\\boxed{" + "{" * 5000,
        "x" * 200_000,
        " " + "1+" * 100_000 + "a",  # backtracks quadratically in math-verify's expression regex
        "\\boxed{" * 20_000,
    ]
    for text in hostile:
        t0 = time.perf_counter()
        extract_answer(text)
        assert time.perf_counter() - t0 < 1.0, text[:30]


def test_multi_part_answers():
    assert split_top_level("(1,2), [0,1), \\{3, 4\\}") == ["(1,2)", "[0,1)", "\\{3, 4\\}"]
    assert answer_parts("\\{1, 3\\}", 2) == ["1", "3"]
    assert answer_parts("$69$,$84$", 2) == ["69", "84"]
    assert strip_dollars("\\$18.90") == "\\$18.90"  # an escaped dollar is currency, kept
    # a k-part gold also accepts the last k boxes
    assert final_answer("\\boxed{1} and \\boxed{3}", n_parts=2) == "1, 3"
    assert final_answer("\\boxed{1} and \\boxed{3}", n_parts=1) == "3"
    # the pool ships cached parses for exactly the strings answers_equal parses
    assert parse_keys(["1", "3"], "3, 1") == ["1, 3", "3, 1", "1", "3", "3", "1"]
    assert parse_keys("$5$", None) == ["5"]


# ---- DAPO verifier ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, norm",
    [
        ("x = \\$1,000.00", "1000"),
        ("27.0", "27"),
        ("\\text{(C)}", "(C)"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("90^\\circ", "90"),
        ("5 \\text{ cm}", "5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\boxed{7}.", "7"),
    ],
)
def test_dapo_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_dapo_reward():
    assert dapo_reward("blah\nAnswer: 27", "27.0") == 1.0  # AMC's float gold
    assert dapo_reward("blah\nAnswer: $\\dfrac{1}{2}$", "\\frac{1}{2}") == 1.0
    assert dapo_reward("so \\boxed{12}", "12") == 1.0  # falls back to the last box
    assert dapo_reward("Answer: 0.5", "\\frac{1}{2}") == 0.0  # strings, no SymPy
    assert dapo_reward("The answer is 12 somewhere", "12") == 0.0  # no Answer: line, no box
    assert dapo_reward("Answer: 12\n" + "x" * 400, "12") == 0.0  # only the last 300 characters
    assert dapo_reward("Answer: 3, 1", ["1", "3"]) == 1.0  # every part, any order
    assert dapo_reward("Answer: 3", ["1", "3"]) == 0.0
    assert dapo_reward("Answer: ", "") == 0.0  # empty never matches


# ---- optional terms --------------------------------------------------------------------------
def test_overlong_penalty_hand_worked():
    # L_max = 100, L_cache = 20: free up to 80, then -1/20 per token, -1 from 100 on
    assert overlong_penalty(0, 100, 20) == 0.0
    assert overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(81, 100, 20) == pytest.approx(-0.05)
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(101, 100, 20) == -1.0
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(10, 100, 0)
    with pytest.raises(ValueError, match="cache_len"):
        OverlongConfig(max_len=10, cache_len=20)


def test_format_term():
    assert format_term("so \\boxed{3}") == 0.0
    assert format_term("so 3") == -1.0
    assert format_term("so \\boxed{}") == -1.0
    assert format_term("...\nAnswer: 3", "dapo") == 0.0
    assert format_term("...\nAnswer: 3", "math") == -1.0


# ---- user reward functions -------------------------------------------------------------------
def test_adapters_in_process():
    from fixtures import user_rewards as ur

    assert detect_signature(ur.verl_reward) == "verl"
    assert detect_signature(ur.trl_reward) == "trl"
    assert detect_signature(ur.native_reward) == "native"
    verl = resolve_reward("fixtures.user_rewards:verl_reward")
    assert isinstance(verl, VerlAdapter)
    assert verl("... 12", "12", data_source="x", extra_info={"bonus": 0.5}) == 1.5  # dict -> "score"
    trl = resolve_reward(ur.trl_reward)
    assert isinstance(trl, TrlAdapter)
    assert trl("the answer is 12", "12", prompt="q") == 1.0
    only = resolve_reward(ur.trl_answer_only)  # no **kwargs: gets only the column it names
    assert only("12", "12") == 1.0 and only("", "12") == 0.0  # None (not applicable) -> 0.0
    native = resolve_reward(ur.native_reward)
    assert native("12", "12", strict=True, prompt="what?", data_source="d") == 1.0  # unknown kwargs dropped


def test_resolve_reward_errors():
    with pytest.raises(ValueError, match="no_such_module"):
        resolve_reward("no_such_module:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        resolve_reward("fixtures.user_rewards:missing")
    with pytest.raises(ValueError, match="expected 'math', 'dapo' or 'module:function'"):
        resolve_reward("mathh")
    with pytest.raises(ValueError, match="expected verl's"):
        resolve_reward(lambda a, b, c: 0.0)


def test_all_boxed():
    assert all_boxed("\\boxed{1}, \\boxed{\\frac{2}{3}} and \\boxed{") == ["1", "\\frac{2}{3}"]
