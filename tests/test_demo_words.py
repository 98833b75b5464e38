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
from stapo.demo.task import exact_reward, solution, split_of
from stapo.demo.task import make_problems as arith_problems
from stapo.objectives.training import objective_from_config


def test_words_problems_match_the_arithmetic_and_vary_their_wording():
    ps = words.make_problems(300, 0, "train")
    assert ps == words.make_problems(300, 0, "train")  # deterministic
    openings = set()
    for p in ps:
        expr = p.prompt.removeprefix("Compute ").removesuffix(".")
        assert p.id == f"demo_words/{expr}" and split_of(expr) == "train"
        parts = expr.split()
        operands, ops = [int(x) for x in parts[::2]], parts[1::2]
        assert solution(operands, ops)[1] == int(p.answer)
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


# --- S2T at work on a small demo_words base (built here: ~20 CPU-s) ---------------------------------

# A small, quickly warm-started base: single-digit operands, hidden 64, a 1,024-token BPE with the MATH
# tail, 2% junk. Its sampled accuracy is low (~7%), but correct responses carry low-p tokens.
SMALL = {"hidden_size": 64, "num_heads": 2, "vocab_size": 1024, "math_text_problems": 1000,
         "tokenizer_problems": 500, "max_operand": 9, "sft_steps": 300, "sft_lr": 3e-3,
         "sft_target_accuracy": None}


@pytest.fixture(scope="module")
def small_rollouts(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.demo.regime import sample_scored

    # one thread: the same floating-point sums (so the same base and rollouts) on every machine, and
    # no OpenMP spin-waiting on a loaded one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = assets.build_base_model(tmp_path_factory.mktemp("words_base"), task="demo_words", log=None, **SMALL)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        problems = words.make_problems(128, 0, "heldout", max_operand=9)
        batch = sample_scored(model, tokenizer, problems, samples=8, max_new_tokens=48, seed=0)
        yield model, tokenizer, batch
    finally:
        torch.set_num_threads(threads)


def test_s2t_candidates_inside_correct_responses(small_rollouts):
    from stapo.objectives.masks import s2t_candidates

    _, _, batch = small_rollouts
    cand = s2t_candidates(batch.old_logprobs, batch.advantages, batch.response_mask, 0.002)
    assert int(cand.sum()) >= 2, "no S2T candidates at τ_p = 0.002: the regime is gone"
    rows = cand.any(dim=1)
    assert bool((batch.rewards[rows] == 1.0).all())  # A > 0: every candidate sits in a correct response
    assert bool((batch.old_logprobs[cand] < math.log(0.002)).all())


def test_measure_regime_counts_are_consistent(small_rollouts):
    from stapo.demo.regime import arithmetic_positions, measure_regime

    model, tokenizer, batch = small_rollouts
    problems = words.make_problems(128, 0, "heldout", max_operand=9)
    r = measure_regime(model, tokenizer, problems, samples=8, max_new_tokens=48, seed=0)
    assert r.n_tokens == int(batch.response_mask.sum())  # the same rollouts as the fixture's
    assert 0 < r.silenced <= r.candidates <= r.low_p_in_correct <= r.low_p
    n_cand = round(r.candidates * r.n_tokens)
    assert r.candidates_in_wording + r.candidates_in_arithmetic == n_cand
    assert r.silenced_in_wording + r.silenced_in_arithmetic == round(r.silenced * r.n_tokens)
    assert len(r.examples) == min(12, round(r.silenced * r.n_tokens))
    ids = tokenizer("So 4 plus 5 is 9. The answer is \\boxed{9}.", add_special_tokens=False)["input_ids"]
    arith = arithmetic_positions(tokenizer, ids)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert arith[pieces.index(" plus")] is False and arith[pieces.index("4")] is True and arith[-1] is True


def test_stapo_loss_is_justrl_over_kept_tokens(small_rollouts):
    from stapo.objectives import policy_loss
    from stapo.objectives.masks import s2t_mask
    from stapo.trainer.phases import policy_stats

    model, _, batch = small_rollouts
    silenced = s2t_mask(batch.old_logprobs, batch.old_entropy, batch.advantages, batch.response_mask)
    assert silenced.any(), "nothing silenced: the equivalence below would be vacuous"
    logprobs = policy_stats(model, batch, 1.0).logprobs.detach().requires_grad_(True)  # a fresh forward
    mask = batch.response_mask
    args = (batch.old_logprobs, batch.advantages)
    stapo_loss, metrics = policy_loss("stapo", logprobs, *args, mask, entropy=batch.old_entropy)
    (g_stapo,) = torch.autograd.grad(stapo_loss, logprobs)
    kept = mask & ~silenced
    justrl_loss, _ = policy_loss("justrl", logprobs, *args, kept)
    (g_justrl,) = torch.autograd.grad(justrl_loss, logprobs)
    assert torch.equal(stapo_loss, justrl_loss) and torch.equal(g_stapo, g_justrl)
    assert bool((g_stapo[silenced] == 0).all()) and bool((g_stapo[kept] != 0).any())
    # float64 reference: -Σ_kept A·clip(ρ) / |kept| (the silenced tokens leave both sums)
    ratio = (logprobs.detach().double() - batch.old_logprobs.double()).exp()
    adv = batch.advantages.double().unsqueeze(1).expand_as(ratio)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.28) * adv)
    reference = -(surrogate[kept]).sum() / kept.sum()
    assert float(stapo_loss.detach()) == pytest.approx(float(reference), rel=1e-5, abs=1e-7)
    assert float(metrics["s2t/silenced"]) == int(silenced.sum())
    # silencing changes the loss: justrl over all valid tokens differs
    assert not torch.equal(policy_loss("justrl", logprobs, *args, mask)[0], stapo_loss)


def test_demo_words_config_update_silences_tokens_over_its_whole_mini_batch(small_rollouts):
    """configs/demo_words.yaml takes one optimizer mini-batch per step (M = P): the trainer's update
    silences exactly the tokens S2T picks over the whole rollout batch, and that scope is what lets
    the mask fire at this candidate rate; mini-batches of 4 prompts (the arithmetic demo's M) silence
    fewer, since a lone candidate is never below its own entropy quantile."""
    import copy

    from stapo.config.train import build_config
    from stapo.objectives.masks import s2t_candidates, s2t_mask
    from stapo.trainer.phases import update_policy

    shipped = build_config("configs/demo_words.yaml")
    assert shipped.optim.mini_batch_prompts == shipped.rollout.prompts_per_step  # one mini-batch per step
    model, _, batch = small_rollouts
    prompts = len(batch) // 8  # the same geometry at the fixture's size
    cfg = build_config("configs/demo_words.yaml", [f"rollout.prompts_per_step={prompts}",
                                                   f"optim.mini_batch_prompts={prompts}"])
    whole = s2t_mask(batch.old_logprobs, batch.old_entropy, batch.advantages, batch.response_mask)
    assert int(whole.sum()) >= 1
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr)
    metrics = update_policy(policy, optimizer, batch, cfg, torch.device("cpu"), params_fresh=True,
                            objective=objective_from_config(cfg)).metrics
    assert metrics["s2t/silenced"] == int(whole.sum()) and metrics["train/optimizer_steps"] == 1
    per_four = sum(int(s2t_mask(b.old_logprobs, b.old_entropy, b.advantages, b.response_mask).sum())
                   for b in batch.split(4 * 8))
    candidates = s2t_candidates(batch.old_logprobs, batch.advantages, batch.response_mask, 0.002)
    assert per_four < int(whole.sum()) <= int(candidates.sum())


def test_trainer_resolves_the_task_names(tmp_path):
    from stapo.config.train import build_config
    from stapo.data.problem_sets import load_problem_sets
    from stapo.trainer.setup import base_model_path

    cfg = build_config("configs/demo_words.yaml", ["data.heldout_size=8", f"output_dir={tmp_path}"])
    train, heldout = load_problem_sets(cfg)
    assert train[0].source == "demo_words" and len(heldout) == 8 and "\\boxed{" in heldout[0].meta["solution"]
    assert train[:5] == words.make_problems(4096, 0, "train")[:5]
    cfg = build_config(None, ["data.heldout_size=8"])
    assert load_problem_sets(cfg)[1][0].source == "demo_arith"
    cfg = build_config(None, ["model.name_or_path=/some/checkpoint"])
    assert base_model_path(cfg) == "/some/checkpoint"  # not a task name: used as given


@pytest.mark.parametrize("argv, field", [(["--model", "/nonexistent"], "--model"), (["--samples", "1"], "--samples"),
                                         (["--prob-threshold", "0"], "--prob-threshold")])
def test_regime_cli_rejects_bad_input(argv, field, capsys):
    from stapo.demo.regime import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and field in capsys.readouterr().err
