"""One update path (issue 18): the objective built once, its keep mask computed once per micro-batch,
and no forward pass that nothing needs.

- forward passes through the policy body in one step at P = 8, G = 2, M = 2 (micro-batch 4), per
  objective and ``objective.statistics``;
- ``statistics: rollout`` is exact where the current policy still is the rollout policy;
- a keep mask handed to the loss is the one its numerator and denominator use.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stapo.config import ConfigError, build_config
from stapo.objectives import policy_loss
from stapo.objectives.training import build_objective, objective_from_config
from stapo.trainer.phases import (
    attach_advantages,
    compute_old_logprobs,
    generate_rollouts,
    old_stats_from_update,
    update_policy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(objective: str, *extra, prompts: int = 8, mini: int = 2):
    return build_config(None, [f"objective.name={objective}", "objective.options={}",
                               f"rollout.prompts_per_step={prompts}", "rollout.n=2", "rollout.max_new_tokens=6",
                               f"optim.mini_batch_prompts={mini}", "optim.micro_batch_size=4",
                               "optim.grad_clip=1e9", *extra])


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir):
    """The tiny model and a real batch of it: 8 prompts × 2 samples, mixed rewards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.rollout import HFGenerator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = [f"Compute {a} + {b}." for a, b in [(1, 2), (30, 4), (55, 61), (7, 70), (3, 9), (12, 5),
                                                   (40, 40), (8, 1)]]
    batch = generate_rollouts(HFGenerator(model, tok), tok, problems, problems, _cfg("justrl").rollout)
    batch.rewards = torch.tensor([float(i % 2 == (i // 2) % 2) for i in range(len(batch))])
    batch = attach_advantages(batch, 2, "grpo")
    assert batch.advantages.abs().max() > 0
    return model, batch


def _one_step(model, batch, cfg):
    """Steps 5-6 of the loop (old statistics, then the update) on copies; returns (model, passes)."""
    model, batch = copy.deepcopy(model), copy.deepcopy(batch)
    passes = []
    hook = model.get_decoder().register_forward_hook(lambda *_: passes.append(torch.is_grad_enabled()))
    try:
        if not old_stats_from_update(cfg, batch, objective=objective_from_config(cfg)):
            batch = batch.with_rollout_stats(compute_old_logprobs(
                model, batch, cfg.rollout.temperature, cfg.optim.micro_batch_size, "cpu", with_collision=False))
        update_policy(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, cfg, "cpu", params_fresh=True,
                      objective=objective_from_config(cfg))
    finally:
        hook.remove()
    return model, passes


# 16 rows: the rollout-policy pass is 4 micro-batches, and 4 mini-batches of 4 rows take one
# backward micro-batch each. S2T / 20-Entropy under `current` add a pre-pass on mini-batches 2-4.
# Before issue 18 every objective ran those 3 pre-passes (justrl: 7 no-grad passes, not 4).
@pytest.mark.parametrize("objective,statistics,no_grad,with_grad", [
    ("justrl", "current", 4, 4),
    ("grpo", "current", 4, 4),
    ("dapo", "current", 4, 4),
    ("dr_grpo", "current", 4, 4),
    ("stapo", "current", 4 + 3, 4),
    ("entropy20", "current", 4 + 3, 4),
    ("stapo", "rollout", 4, 4),
    ("entropy20", "rollout", 4, 4),
])
def test_forward_passes_per_step(model_and_batch, objective, statistics, no_grad, with_grad):
    model, batch = model_and_batch
    _, passes = _one_step(model, batch, _cfg(objective, f"objective.statistics={statistics}"))
    assert (passes.count(False), passes.count(True)) == (no_grad, with_grad)


def test_one_minibatch_justrl_runs_one_pass_per_micro_batch(model_and_batch):
    """M = P: the update's own forward scores the rollout policy (4 passes in all, with grad)."""
    model, batch = model_and_batch
    _, passes = _one_step(model, batch, _cfg("justrl", prompts=8, mini=8))
    assert passes == [True] * 4


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("objective", ["stapo", "entropy20"])
def test_rollout_statistics_are_exact_on_the_first_minibatch(model_and_batch, objective):
    """At M = P the only mini-batch is scored by the rollout policy: `rollout` and `current` agree bit for bit;
    at M < P later mini-batches differ (the policy has moved), and both still train."""
    model, batch = model_and_batch
    options = "objective.options={prob_threshold: 0.3}" if objective == "stapo" else "objective.options={}"
    one = [_params(_one_step(model, batch, _cfg(objective, options, f"objective.statistics={s}", mini=8))[0])
           for s in ("current", "rollout")]
    assert torch.equal(one[0], one[1])
    four = [_params(_one_step(model, batch, _cfg(objective, options, f"objective.statistics={s}"))[0])
            for s in ("current", "rollout")]
    base = _params(model)
    assert (four[0] - base).abs().max() > 0 and (four[1] - base).abs().max() > 0
    assert not torch.equal(four[0], four[1])


def test_statistics_option_is_validated():
    with pytest.raises(ConfigError, match="objective.statistics"):
        build_config(None, ["objective.statistics=stale"])
    with pytest.raises(ValueError, match="objective.statistics"):
        build_objective("stapo", statistics="stale")


def test_objective_declares_what_it_needs():
    assert not build_objective("justrl").needs_statistics
    assert not build_objective("justrl").needs_current_pass(params_fresh=False)
    assert build_objective("stapo").needs_current_pass(params_fresh=False)
    assert not build_objective("stapo").needs_current_pass(params_fresh=True)
    assert not build_objective("stapo", statistics="rollout").needs_current_pass(params_fresh=False)
    dasd = build_objective("dasd")  # its statistics are the rollout policy's and the teacher's: no pre-pass
    assert dasd.needs_teacher and dasd.needs_statistics and not dasd.needs_current_pass(params_fresh=False)
    assert build_objective("grpo", {"kl_coef": 0.1}).needs_reference
    assert objective_from_config(_cfg("dr_grpo")).config.norm_length == 6  # the generation budget


def _toy(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 8).requires_grad_()
    old = logprobs.detach() + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    return logprobs, old, adv, mask, entropy


@pytest.mark.parametrize("name", ["stapo", "entropy20"])
def test_given_keep_mask_equals_the_computed_one(name):
    from stapo.objectives import loss_token_mask

    logprobs, old, adv, mask, entropy = _toy()
    options = {"prob_threshold": 0.3} if name == "stapo" else {}
    keep = loss_token_mask(name, logprobs, entropy, adv, mask, **options)
    assert 0 < int(keep.sum()) < int(mask.sum())
    a, _ = policy_loss(name, logprobs, old, adv, mask, entropy=entropy, **options)
    (ga,) = torch.autograd.grad(a, logprobs)
    b, _ = policy_loss(name, logprobs, old, adv, mask, entropy=entropy, keep_mask=keep, **options)
    (gb,) = torch.autograd.grad(b, logprobs)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_keep_mask_serves_numerator_and_denominator():
    """An arbitrary keep mask: loss = Σ_keep l / |keep| (float64 reference), exactly zero gradient elsewhere."""
    from stapo.objectives import JustRLConfig, clipped_surrogate

    logprobs, old, adv, mask, entropy = _toy(seed=1)
    keep = mask.clone()
    keep[0, :3] = False
    keep[2, 4] = False
    loss, metrics = policy_loss("stapo", logprobs, old, adv, mask, entropy=entropy, keep_mask=keep)
    per_token, _, _ = clipped_surrogate(logprobs.detach(), old, adv, JustRLConfig())
    assert torch.allclose(loss.detach(), per_token[keep].sum() / keep.sum(), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.all(grad[~keep] == 0) and grad[keep].abs().max() > 0
    assert int(metrics["s2t/silenced"]) == int((mask & ~keep).sum())
    with pytest.raises(ValueError, match="has no keep mask"):
        policy_loss("justrl", logprobs, old, adv, mask, keep_mask=keep)
