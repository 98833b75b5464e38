"""The demo_words task (issue 16): worded solutions, MATH-tail tokenizer, junk-tolerant warm start,
and S2T at work on a small base built here: candidates inside correct responses at τ_p = 0.002, and
stapo's loss = justrl's loss over the kept tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random

import pytest
import torch

from stapo.demo import TASKS, assets, words
from stapo.demo.sft import IGNORE, collate_sft, insert_junk
from stapo.demo.task import exact_reward, split_of
from stapo.demo.task import make_problems as arith_problems


def test_words_problems_match_the_arithmetic_and_vary_their_wording():
    ps = words.make_problems(300, 0, "train")
    assert ps == words.make_problems(300, 0, "train")  # deterministic
    openings = set()
    for p in ps:
        expr = p.prompt.removeprefix("Compute ").removesuffix(".")
        assert p.id == f"demo_words/{expr}" and split_of(expr) == "train"
        assert eval(expr) == int(p.answer)  # noqa: S307 - digits, spaces, + and - only
        assert exact_reward(p.meta["solution"], p.answer) == 1.0
        openings.add(p.meta["solution"].split(" ")[0])
    assert len(openings) >= 5  # several phrasings of the first step
    held = {p.prompt for p in words.make_problems(200, 0, "heldout")}
    assert held.isdisjoint(p.prompt for p in ps)


def test_worded_solution_steps():
    text, value = words.worded_solution([37, 48, 19], ["+", "-"], random.Random(0))
    assert value == 66 and text.endswith("\\boxed{66}.") and "85" in text
    assert text.count(".") == 3  # one sentence per step and the closer


def test_math_texts_are_package_data():
    texts = words.math_texts(5)
    assert len(texts) == 5 and all(isinstance(t, str) and t for t in texts)
    assert len(words.math_texts()) == 2000


def test_insert_junk_and_collate_leave_junk_out_of_the_loss():
    rng = random.Random(0)
    response = list(range(10, 60))
    ids, junk = insert_junk(response, 0.3, [900, 901], rng)
    assert [t for i, t in enumerate(ids) if i not in junk] == response  # the solution is intact
    assert junk and all(ids[j] in (900, 901) for j in junk) and 0 not in junk
    assert insert_junk(response, 0.0, [900], rng) == (response, [])
    batch = collate_sft([([1, 2], ids, junk), ([1, 2, 3], [5, 6])], pad_token_id=0)
    labels = batch["labels"]
    assert all(labels[0, 2 + j] == IGNORE for j in junk)
    kept = [2 + j for j in range(len(ids)) if j not in junk]
    assert labels[0, kept].tolist() == response
    assert labels[1].tolist() == [IGNORE] * 3 + [5, 6] + [IGNORE] * (labels.shape[1] - 5)


def test_arith_base_hash_is_unchanged_by_the_new_fields():
    s = assets.BaseModelSettings()
    old = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("task", "math_text_problems", "junk_rate")}
    assert s.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    w = assets.task_settings("demo_words")
    assert w.key() != s.key() and w.junk_rate == 0.02 and w.vocab_size == 2048
    assert assets.base_model_dir("/c", w).name.startswith("demo-words-base-")
    with pytest.raises(ValueError, match="task"):
        assets.BaseModelSettings(task="nope")
    with pytest.raises(ValueError, match="junk_rate"):
        assets.BaseModelSettings(junk_rate=1.0)


def test_tokenizer_has_a_math_tail_and_single_digits():
    tok = assets.build_tokenizer(assets.task_settings("demo_words", vocab_size=512, math_text_problems=300,
                                                      tokenizer_problems=200))
    assert len(tok) == 512
    vocab = tok.get_vocab()
    assert not any(len(t) > 1 and t.strip("▁").isdigit() for t in vocab)  # digits stay single tokens
    text = words.make_problems(1, 0, "train")[0].meta["solution"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert any("\\" in t or "$" in t for t in vocab)  # LaTeX pieces from the MATH texts


def test_task_registry():
    assert set(TASKS) == {"demo", "demo_words"}
    assert TASKS["demo"].make_problems is arith_problems
    assert math.isclose(assets.task_settings().junk_rate, 0.0)
