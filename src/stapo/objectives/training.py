"""An objective built once per run: its config, what it needs, and its per-mini-batch plan.

The registry (``stapo.objectives.registry``) holds pure functions; ``build_objective`` binds one
to the run's options and says what the trainer has to compute for it:

- ``needs_entropy``, ``needs_teacher``, ``needs_reference``: extra per-token inputs;
- ``needs_statistics``: the keep mask or a mini-batch-wide statistic is needed before the loss;
- ``needs_current_pass(params_fresh)``: those statistics must come from the *current* policy
  (a no-grad pre-pass over the mini-batch), which holds only for ``statistics="current"``
  (the STAPO paper's method) on a mini-batch after the first.

``statistics="rollout"`` takes the statistics from the rollout policy (``old_logprobs``,
``old_entropy``) instead: no pre-pass, and exact on the first mini-batch of a step, where the
current policy still is the rollout policy.

``plan`` turns a mini-batch's statistics into a ``MinibatchPlan`` (``stapo.objectives.planner``, the
one planner the TRL and verl integrations call too): the config with the mini-batch-wide overrides
(τ_h), each micro-batch's keep mask, computed once, and the global denominator. ``loss`` then uses
that very mask for the numerator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .planner import MinibatchPlan, identity, plan_minibatch
from .registry import Objective, TokenStats, call_objective, get_objective

STATISTICS = ("current", "rollout")


@dataclasses.dataclass(frozen=True)
class TrainingObjective:
    spec: Objective
    config: Any  # the objective's config dataclass with the run's options
    statistics: str = "current"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_entropy(self) -> bool:
        return self.spec.needs_entropy

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher

    @property
    def needs_reference(self) -> bool:
        return self.config.kl_coef > 0

    @property
    def needs_statistics(self) -> bool:
        """A keep mask or mini-batch-wide statistic must exist before the loss."""
        s = self.spec
        return s.keep_mask is not None or s.minibatch_overrides is not None or s.needs_teacher

    def needs_current_pass(self, params_fresh: bool) -> bool:
        """A no-grad forward of the current policy over the mini-batch is needed before the loss."""
        return self.spec.policy_statistics and self.statistics == "current" and not params_fresh

    def plan(self, stats: Sequence[TokenStats], gather=None, all_reduce=identity) -> MinibatchPlan:
        """This objective's ``plan_minibatch``: ``stats`` holds one ``TokenStats`` per micro-batch;
        ``gather`` / ``all_reduce`` are the ranks' collectives (None / identity = one process)."""
        return plan_minibatch(self.spec, self.config, stats, gather=gather, all_reduce=all_reduce)

    def loss(self, plan: MinibatchPlan, index: int, logprobs, old_logprobs, micro, *, entropy=None,
             denominator: float | None = None):
        """Micro-batch ``index``'s loss under ``plan`` (its keep mask, the mini-batch denominator)."""
        keep = plan.keep_masks[index]
        return call_objective(
            self.spec, plan.config, logprobs, old_logprobs, micro.advantages, micro.response_mask,
            entropy=entropy if self.needs_entropy else None, ref_logprobs=micro.ref_logprobs,
            teacher_logprobs=micro.teacher_logprobs, denominator=denominator,
            keep_mask=None if keep is None else keep.to(logprobs.device),
        )


def build_objective(name: str, options: dict | None = None, *, statistics: str = "current") -> TrainingObjective:
    """Objective ``name`` with ``options`` applied (unknown keys are an error listing the valid ones)."""
    if statistics not in STATISTICS:
        raise ValueError(f"objective.statistics must be one of {', '.join(STATISTICS)}; got {statistics!r}")
    spec = get_objective(name)
    return TrainingObjective(spec, spec.config(**(options or {})), statistics)


def objective_from_config(cfg) -> TrainingObjective:
    """The run's objective from a ``TrainConfig`` whose ``objective.options`` the config layer resolved
    (``stapo.config.objective.resolve_options``: Dr. GRPO's ``norm_length`` is the generation budget)."""
    return build_objective(cfg.objective.name, cfg.objective.options,
                           statistics=getattr(cfg.objective, "statistics", "current"))
