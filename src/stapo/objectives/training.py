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

``plan`` turns a mini-batch's statistics into a ``MinibatchPlan``: the config with the
mini-batch-wide overrides (τ_h), each micro-batch's keep mask, computed once, and the local unit
count the global denominator sums. ``loss`` then uses that very mask for the numerator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .aggregate import count_units
from .registry import (
    Objective,
    TokenStats,
    call_objective,
    denominator_token_mask,
    get_objective,
    objective_keep_mask,
)

STATISTICS = ("current", "rollout")


@dataclasses.dataclass(frozen=True)
class MinibatchPlan:
    """What one optimizer mini-batch's loss needs before any gradient is taken."""

    config: Any  # the objective's config with the mini-batch-wide overrides (e.g. τ_h)
    keep_masks: list[torch.Tensor | None]  # per micro-batch [b, T] bool; None = all valid tokens
    local_units: int  # units (tokens or sequences) this rank's micro-batches normalise over


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

    def plan(self, stats: Sequence[TokenStats], gather=None) -> MinibatchPlan:
        """Overrides, keep masks (once per micro-batch) and the local unit count of one mini-batch.

        ``stats``: one ``TokenStats`` per micro-batch; ``gather`` concatenates a 1-D tensor over
        ranks (None = one process).
        """
        spec, config = self.spec, self.config
        if spec.minibatch_overrides is not None:
            if spec.needs_entropy and any(s.entropy is None for s in stats):
                raise ValueError(f"objective {spec.name!r} needs per-token `entropy` in every TokenStats")
            config = dataclasses.replace(config, **spec.minibatch_overrides(config, stats, gather))
        keeps: list[torch.Tensor | None] = []
        units = 0
        for s in stats:
            keep = objective_keep_mask(spec, config, s.logprobs, s.entropy, s.advantages, s.response_mask)
            units += count_units(denominator_token_mask(spec, config, keep, s.response_mask),
                                 config.loss_agg_mode)
            keeps.append(keep if spec.keep_mask is not None else None)
        return MinibatchPlan(config, keeps, units)

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


def build_objective(name: str, options: dict | None = None, *, statistics: str = "current",
                    norm_length: int | None = None) -> TrainingObjective:
    """Objective ``name`` with ``options`` applied (unknown keys are an error listing the valid ones).

    ``norm_length``: Dr. GRPO's constant normaliser when ``options`` leave it unset (the trainer
    passes the generation budget, not each micro-batch's padded T).
    """
    if statistics not in STATISTICS:
        raise ValueError(f"objective.statistics must be one of {', '.join(STATISTICS)}; got {statistics!r}")
    spec = get_objective(name)
    options = dict(options or {})
    if norm_length is not None:
        options.setdefault("norm_length", norm_length)
    return TrainingObjective(spec, spec.config(**options), statistics)


def objective_from_config(cfg) -> TrainingObjective:
    """The run's objective from a ``TrainConfig`` (``objective.*``, ``rollout.max_new_tokens``)."""
    return build_objective(cfg.objective.name, cfg.objective.options,
                           statistics=getattr(cfg.objective, "statistics", "current"),
                           norm_length=cfg.rollout.max_new_tokens)
