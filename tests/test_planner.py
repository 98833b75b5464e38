"""One mini-batch planner (``stapo.plan_minibatch``) behind stapo's trainer, TRL and verl.

The same statistics (tests/helpers/planner_cases.py) go through the trainer's
``TrainingObjective.plan`` and the TRL integration's ``plan_segment``: identical τ_h, keep masks and
denominator, and on a real TRL step TRL's own loss equals the trainer path's loss on TRL's tensors.
tests/test_verl_loss.py does the same for verl's ``minibatch_statistics`` (verl's environment).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from helpers.planner_cases import TAU_P, micro_batches, micro_view
from stapo.objectives import build_objective, plan_minibatch, quantile, s2t_candidates

trl_integration = pytest.importorskip("stapo.integrations.trl")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()  # the TRL step's model is tiny: one thread is fastest on a shared machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer_plan(stats, tau_p=TAU_P):
    objective = build_objective("stapo", {"prob_threshold": tau_p})
    return objective, objective.plan(stats)


def test_trainer_and_trl_plan_identically():
    stats = micro_batches()
    objective, plan = _trainer_plan(stats)
    trl = trl_integration.plan_segment(stats, TAU_P, objective.config.entropy_quantile, start=0, items_scale=1.0)
    cands = [s.entropy.double()[s2t_candidates(s.logprobs, s.advantages, s.response_mask, TAU_P)] for s in stats]
    tau = quantile(torch.cat(cands), objective.config.entropy_quantile)  # over both micro-batches
    assert plan.overrides == {"entropy_threshold": tau} and trl.threshold == tau
    for s, keep, silenced in zip(stats, plan.keep_masks, trl.silenced):
        assert torch.equal(keep, s.response_mask & ~silenced)
    assert any(bool(m.any()) for m in trl.silenced)  # the mask bites here
    assert float(trl.num_items_in_batch) == plan.denominator == sum(int(k.sum()) for k in plan.keep_masks)
    assert trl.silenced_count == sum(int(m.sum()) for m in trl.silenced)


def test_collectives_are_the_callers():
    """``gather`` sees the local candidates' entropies; ``all_reduce`` turns local units into the denominator."""
    stats = micro_batches(seed=1)
    objective = build_objective("stapo", {"prob_threshold": TAU_P})
    seen = []

    def gather(values):  # a second rank holding the same statistics
        seen.append(values.numel())
        return torch.cat([values, values])

    two = plan_minibatch(objective.spec, objective.config, stats, gather=gather, all_reduce=lambda n: 2 * n)
    one = objective.plan(stats)
    assert seen and two.overrides == one.overrides  # the quantile of a doubled set is the same
    assert two.denominator == 2 * one.local_units == 2 * two.local_units
    assert all(torch.equal(a, b) for a, b in zip(two.keep_masks, one.keep_masks))


def test_real_trl_step_loss_equals_the_trainer_path():
    """A real STAPOTrainer step (2 accumulation micro-batches): the trainer path on TRL's own tensors
    gives TRL's masks exactly and TRL's loss to rounding."""
    from trl_common import (
        BASE,
        HIGH_PROB_THRESHOLD,
        RecordingTrainer,
        digit_fraction,
        prompts,
        tiny_model_and_tok,
    )

    config = trl_integration.STAPOConfig(output_dir=os.path.join(tempfile.gettempdir(), "stapo-planner-tests"),
                                         **{**BASE, "max_steps": 1, "gradient_accumulation_steps": 2,
                                            "s2t_prob_threshold": HIGH_PROB_THRESHOLD})
    model, tok = tiny_model_and_tok()
    trainer = RecordingTrainer(model=model, reward_funcs=digit_fraction, args=config, train_dataset=prompts(),
                               processing_class=tok)
    trainer.train()
    (_, trl_plan, stats), = trainer.plans
    objective, plan = _trainer_plan(stats, HIGH_PROB_THRESHOLD)
    assert plan.overrides["entropy_threshold"] == trl_plan.threshold
    assert plan.denominator == float(trl_plan.num_items_in_batch)
    assert any(bool(m.any()) for m in trl_plan.silenced)
    assert len(trainer.loss_calls) == 2
    for i, ((_, loss, _, logps, entropy), s) in enumerate(zip(trainer.loss_calls, stats)):
        assert torch.equal(plan.keep_masks[i], s.response_mask & ~trl_plan.silenced[i])
        leaf = logps.detach().clone().requires_grad_(True)
        ours, _ = objective.loss(plan, i, leaf, leaf.detach(), micro_view(s), entropy=entropy.detach(),
                                 denominator=plan.denominator)
        ours.backward()
        assert abs(float(loss) - float(ours.detach())) <= 1e-6 * max(abs(float(ours.detach())), 1e-3)
        torch.testing.assert_close(logps.grad, leaf.grad, rtol=1e-5, atol=1e-8)
