"""Planning one optimizer mini-batch: the one place stapo's trainer, TRL and verl decide what the loss keeps.

``plan_minibatch`` turns the micro-batches' statistics into a ``MinibatchPlan``:

1. the mini-batch-wide statistics (S2T's τ_h, the 20-Entropy cut, DASD's gap moments), taken over
   every micro-batch on every rank (``gather``), as config overrides;
2. each micro-batch's keep mask under that config, computed once, so the numerator and the
   denominator use the same tokens (all at once by the objective's ``select`` for a selection over
   the whole mini-batch that is not a threshold: Clip-Cov's count, KL-Cov's top-k);
3. the tokens the objective acts on (``Objective.selected``: S2T's silenced, Clip-Cov's detached,
   ...), per micro-batch, for the diagnostics (``stapo.diagnostics.metrics.selection_sums``);
4. the global denominator: the loss units (tokens or sequences) summed over micro-batches, then
   over ranks (``all_reduce``).

``gather`` concatenates a 1-D tensor over ranks and ``all_reduce`` sums a number over ranks; both
are the identity on one process (``gather=None`` too). ``stapo.distributed`` provides both for
torch.distributed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .aggregate import count_units
from .registry import Objective, TokenStats, denominator_token_mask, objective_keep_mask


def identity(value):
    """The one-process collective: the local value is the global one."""
    return value


@dataclasses.dataclass(frozen=True)
class MinibatchPlan:
    """What one optimizer mini-batch's loss needs before any gradient is taken."""

    config: Any  # the objective's config with ``overrides`` applied
    overrides: dict[str, Any]  # the mini-batch-wide statistics, e.g. {"entropy_threshold": τ_h}
    keep_masks: list[torch.Tensor | None]  # per micro-batch [b, T] bool; None = all valid tokens (no keep mask)
    local_units: int  # units (tokens or sequences) this rank's micro-batches normalise over
    denominator: float  # ``local_units`` summed over all ranks: the loss's global normaliser
    selected: list[torch.Tensor] | None = None  # per micro-batch [b, T] bool: the tokens acted on; None: no action


def plan_minibatch(spec: Objective, config: Any, stats: Sequence[TokenStats], *,
                   gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   all_reduce: Callable[[int], float] = identity) -> MinibatchPlan:
    """Objective ``spec``'s plan (config ``config``) for the mini-batch whose micro-batches are ``stats``."""
    overrides: dict[str, Any] = {}
    if spec.minibatch_overrides is not None:
        if spec.needs_entropy and any(s.entropy is None for s in stats):
            raise ValueError(f"objective {spec.name!r} needs per-token `entropy` in every TokenStats")
        overrides = spec.minibatch_overrides(config, stats, gather)
        config = dataclasses.replace(config, **overrides)
    keeps: list[torch.Tensor | None] = []
    units = 0
    selected = spec.select(config, stats, gather) if spec.select is not None else None
    for i, s in enumerate(stats):
        keep = (selected[i] if selected is not None
                else objective_keep_mask(spec, config, s.logprobs, s.entropy, s.advantages, s.response_mask))
        units += count_units(denominator_token_mask(spec, config, keep, s.response_mask), config.loss_agg_mode)
        keeps.append(keep if spec.keep_mask is not None else None)
    chosen = None
    if spec.action is not None:
        chosen = [spec.selected(k, s.response_mask) for k, s in zip(keeps, stats)]
    return MinibatchPlan(config, overrides, keeps, units, all_reduce(units), chosen)
