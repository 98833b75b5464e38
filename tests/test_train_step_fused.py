"""One forward fewer per step (benchmark 3, issue 11) and fixed response lengths.

- ``old_stats_from_update``: when the step is one mini-batch and nothing needs the rollout policy's
  statistics before the loss, ``update_policy`` scores the rollout policy in its own first forward;
  the update, and the statistics it returns, equal the two-pass ones;
- the phases flow forward: each returns what it produced and leaves the batch it was given untouched;
- ``rollout.min_new_tokens`` reaches ``generate`` (min = max fixes every response's length).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from stapo.config import ConfigError, build_config
from stapo.objectives.training import objective_from_config
from stapo.trainer.phases import (
    attach_advantages,
    compute_old_logprobs,
    generate_rollouts,
    old_stats_from_update,
    sampling_config,
    update_policy,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the model is tiny: one intra-op thread is several times faster than two on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(tiny_model_dir)


def _cfg(*extra, objective="justrl", prompts=4, mini=4):
    return build_config(None, [f"objective.name={objective}", "objective.options={}",
                               f"rollout.prompts_per_step={prompts}", "rollout.n=4", "rollout.max_new_tokens=6",
                               f"optim.mini_batch_prompts={mini}", "optim.micro_batch_size=3", *extra])


@pytest.fixture(scope="module")
def rollout(model_tok):
    """A real batch of the tiny model: 4 prompts × 4 samples, mixed rewards, no old statistics yet."""
    from stapo.rollout import HFGenerator

    model, tok = model_tok
    cfg = _cfg()
    problems = [f"Compute {a} + {b}." for a, b in [(1, 2), (30, 4), (55, 61), (7, 70)]]
    batch = generate_rollouts(HFGenerator(model, tok), tok, problems, problems, cfg.rollout)
    batch.rewards = torch.tensor([float(len(t) % 2 == 0) for t in batch.response_texts])
    batch = attach_advantages(batch, 4, "grpo")
    assert batch.advantages.abs().max() > 0 and batch.old_logprobs is None
    return batch


def _update(model, batch, cfg, collision):
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    update = update_policy(m, opt, batch, cfg, "cpu", params_fresh=True, collision=collision,
                           objective=objective_from_config(cfg))
    return m, update


def test_update_scoring_the_rollout_policy_itself_equals_the_two_pass_update(model_tok, rollout):
    model, _ = model_tok
    cfg = _cfg("optim.ppo_epochs=2")  # the second sweep reads the statistics the first one scored
    assert old_stats_from_update(cfg, rollout, objective=objective_from_config(cfg))
    two_pass = rollout.with_rollout_stats(compute_old_logprobs(model, rollout, 1.0, 3, "cpu", with_collision=True))
    m_ref, ref = _update(model, two_pass, cfg, collision=True)
    assert ref.rollout_stats is None  # the batch brought them
    m, fused = _update(model, rollout, cfg, collision=True)
    assert fused.metrics["train/optimizer_steps"] == 2
    assert rollout.old_logprobs is None  # returned, not written into the batch
    # the same per-token statistics (the no-grad and the grad forward run the same kernels) ...
    for stat, field in (("logprobs", "old_logprobs"), ("entropy", "old_entropy"), ("collision", "old_collision")):
        assert torch.equal(getattr(fused.rollout_stats, stat), getattr(two_pass, field)), field
    # ... hence the same update, bit for bit, and the same metrics
    for (name, p), p_ref in zip(m.named_parameters(), m_ref.parameters()):
        assert torch.equal(p, p_ref), name
    assert fused.metrics == ref.metrics
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), model.parameters()))  # it did train
    # without diagnostics no collision is computed
    _, lean = _update(model, rollout, cfg, collision=False)
    assert lean.rollout_stats.collision is None and torch.equal(lean.rollout_stats.logprobs, two_pass.old_logprobs)


def _fields(batch) -> dict:
    """Every field of ``batch``, tensors cloned: what a phase must leave as it found it."""
    return {f.name: (v.clone() if isinstance(v := getattr(batch, f.name), torch.Tensor) else copy.copy(v))
            for f in dataclasses.fields(batch)}


def _assert_same(before: dict, batch, phase: str) -> None:
    for name, value in before.items():
        now = getattr(batch, name)
        same = isinstance(now, torch.Tensor) and torch.equal(now, value) if isinstance(value, torch.Tensor) \
            else now == value
        assert same, f"{phase} wrote the input batch's {name}"


def test_each_phase_returns_what_it_produced_and_leaves_its_input_untouched(model_tok, rollout):
    from stapo.data.problem import Problem
    from stapo.rewards import RewardPool
    from stapo.trainer.phases import correct_rollout_engine, score_rollouts

    model, _ = model_tok
    records = [Problem(f"t/{i}", text, "1", "t") for i, text in enumerate(rollout.problems)]
    generated = dataclasses.replace(rollout, problems=records, rewards=None, advantages=None)
    before = _fields(generated)
    with RewardPool("helpers.rewards:digit_reward", num_workers=1) as pool:  # 3. rewards
        scored, metrics = score_rollouts(pool, generated)
    _assert_same(before, generated, "score_rollouts")
    assert scored.rewards.shape == (len(generated),) and "reward/mean" in metrics
    before = _fields(scored)
    with_adv = attach_advantages(scored, 4, "grpo")  # 4. advantages
    _assert_same(before, scored, "attach_advantages")
    assert with_adv.advantages.shape == (len(scored),)
    before = _fields(with_adv)
    stats = compute_old_logprobs(model, with_adv, 1.0, 3, "cpu", with_collision=True)  # 5. rollout policy
    _assert_same(before, with_adv, "compute_old_logprobs")
    engine = dataclasses.replace(with_adv.with_rollout_stats(stats), rollout_logprobs=stats.logprobs - 0.1)
    before = _fields(engine)
    corrected, tis = correct_rollout_engine(engine, 2.0)  # 5. TIS
    _assert_same(before, engine, "correct_rollout_engine")
    assert corrected.advantages.shape == engine.response_mask.shape and tis
    for name, cfg in (("stapo", _cfg(objective="stapo", mini=2)), ("justrl", _cfg())):  # 6. update, both paths
        batch = with_adv.with_rollout_stats(stats) if name == "stapo" else with_adv
        before = _fields(batch)
        _, update = _update(model, batch, cfg, collision=True)
        _assert_same(before, batch, f"update_policy ({name})")
        assert update.metrics["train/optimizer_steps"] >= 1
        assert (update.rollout_stats is None) == (name == "stapo")
        assert (update.selected is not None) == (name == "stapo")  # S2T's silenced set, [B, T]
        if update.selected is not None:
            assert update.selected.shape == batch.response_mask.shape


def test_a_separate_pass_whenever_something_needs_the_statistics_first(model_tok, rollout):
    model, _ = model_tok
    assert old_stats_from_update(_cfg(objective="grpo"), rollout, objective=objective_from_config(_cfg(objective="grpo")))
    needs_pass = {
        "S2T threshold and mask": _cfg(objective="stapo"),
        "20-entropy quantile": _cfg(objective="entropy20"),
        "several mini-batches": _cfg(prompts=4, mini=2),
        "teacher pass": _cfg(objective="dasd"),
    }
    for why, cfg in needs_pass.items():
        assert not old_stats_from_update(cfg, rollout, objective=objective_from_config(cfg)), why
    cfg = _cfg()
    assert not old_stats_from_update(cfg, rollout, objective=objective_from_config(cfg), gate=object())
    assert not old_stats_from_update(cfg, rollout, objective=objective_from_config(cfg), ref_model=model)
    engine = copy.deepcopy(rollout)
    engine.rollout_logprobs = torch.zeros_like(engine.response_mask, dtype=torch.float32)  # vLLM: TIS first
    assert not old_stats_from_update(cfg, engine, objective=objective_from_config(cfg))
    # and update_policy refuses to guess
    with pytest.raises(ValueError, match="run compute_old_logprobs first"):
        _update(model, copy.deepcopy(rollout), _cfg(objective="stapo"), collision=False)


def test_min_new_tokens_fixes_the_response_length(model_tok):
    from stapo.rollout import HFGenerator

    model, tok = model_tok
    cfg = _cfg("rollout.min_new_tokens=6")
    assert sampling_config(cfg.rollout).min_new_tokens == 6 and _cfg().rollout.min_new_tokens == 0
    problems = [f"Compute {a} + {b}." for a, b in [(1, 2), (30, 4)]]
    batch = generate_rollouts(HFGenerator(model, tok), tok, problems, problems, cfg.rollout)
    assert batch.response_lengths.tolist() == [6] * 8
    with pytest.raises(ConfigError, match="rollout.min_new_tokens"):
        _cfg("rollout.min_new_tokens=7")


def test_trainer_step_without_the_separate_pass(tiny_model_dir, tmp_path):
    import json

    from stapo.trainer.loop import train

    run = train(build_config(None, [
        f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path}", "run_name=run", "steps=1",
        "reward.name=helpers.rewards:digit_reward", "reward.num_workers=1", "objective.name=justrl",
        "objective.options={}", "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=6",
        "rollout.min_new_tokens=6", "optim.mini_batch_prompts=2", "optim.micro_batch_size=3", "data.heldout=null",
        "save_every=100", "threads=1"]), quiet=True)
    step = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert step["train/optimizer_steps"] == 1 and step["response/length_mean"] == 6
    # the diagnostics read the statistics the update left in the batch
    diag = {k: v for k, v in step.items() if k.startswith("diag/")}
    assert diag and all(math.isfinite(v) for v in diag.values())
