"""Objectives by name (after verl's ``register_policy_loss``).

An objective is a pure function ``fn(cfg, logprobs, old_logprobs, advantages,
response_mask, *, entropy, ref_logprobs, denominator) -> (loss, metrics)`` plus a
config dataclass holding its paper defaults. Optional hooks let the trainer stay
free of per-objective branches:

- ``keep_mask(cfg, logprobs, entropy, advantages, response_mask)``: the tokens that
  carry the loss (S2T's unsilenced tokens, 20-Entropy's top tokens). An objective
  with a keep mask also takes it as ``fn(..., keep_mask=...)``, so a caller computes
  it once and the same mask serves the numerator and the global denominator;
- ``denominator_mask(cfg, keep, response_mask)``: the tokens the loss is normalised
  over, when that is not ``keep`` (20-Entropy's ``normalize_by: all``);
- ``minibatch_overrides(cfg, stats, gather)``: statistics that must be taken over
  the whole optimizer mini-batch (e.g. τ_h), returned as config overrides;
- ``select(cfg, stats, gather)``: every micro-batch's keep mask at once, for a selection that is
  not a threshold (Clip-Cov's random choice of a count, KL-Cov's top-k); the planner calls it
  instead of ``keep_mask`` per micro-batch. A keep mask may also mark the tokens an extra term
  acts on (KL-Cov's penalised tokens); ``denominator_mask`` then says what the loss is normalised over.

``action`` names what a token-selecting objective does to the tokens it selects, for the
diagnostics (``stapo.diagnostics.metrics.selection_sums``): ``ACTIONS`` says whether those are the tokens its
keep mask drops (S2T's silenced, Clip-Cov's detached) or keeps (20-Entropy's, KL-Cov's penalised).

``policy_statistics`` says whether those hooks read a policy's log-probs / entropy
(S2T, 20-Entropy) rather than only the rollout policy's and the teacher's (DASD):
only then does the trainer need a policy's statistics before the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

# what a selecting objective does to its selected tokens -> are they the keep mask's kept or dropped ones
ACTIONS = {"silenced": "dropped", "detached": "dropped", "kept": "kept", "penalised": "kept"}


class TokenStats(NamedTuple):
    """Detached per-token statistics of one micro-batch, all [B, T] (advantages may be [B])."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    advantages: torch.Tensor
    response_mask: torch.Tensor
    teacher_logprobs: torch.Tensor | None = None  # privileged-context log-probs (self-distillation)
    old_logprobs: torch.Tensor | None = None  # the rollout policy's log-probs (fixed for the whole step)


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    config_cls: type
    needs_entropy: bool = False
    keep_mask: Callable[..., torch.Tensor] | None = None
    minibatch_overrides: Callable[..., dict[str, Any]] | None = None
    needs_teacher: bool = False  # takes `teacher_logprobs` [B, T] (self-distillation objectives)
    denominator_mask: Callable[..., torch.Tensor] | None = None  # None: normalise over the keep mask
    policy_statistics: bool = False  # the hooks read a policy's log-probs / entropy (not only old / teacher)
    select: Callable[..., list[torch.Tensor]] | None = None  # all micro-batches' keep masks at once
    action: str | None = None  # a key of ACTIONS: the objective selects tokens; None: it does not

    def selected(self, keep: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor | None:
        """The valid tokens this objective acts on [B, T] bool, from its keep mask; None without ``action``."""
        if self.action is None:
            return None
        valid = response_mask.bool()
        return valid & keep.bool() if ACTIONS[self.action] == "kept" else valid & ~keep.bool()

    def config(self, **overrides) -> Any:
        """The paper defaults with ``overrides`` applied; unknown keys are an error that lists the valid ones."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"objective {self.name!r} has no option(s) {unknown}; valid options: {sorted(fields)}"
            )
        return self.config_cls(**overrides)


_REGISTRY: dict[str, Objective] = {}
OBJECTIVES: Mapping[str, Objective] = MappingProxyType(_REGISTRY)


def register_objective(
    name: str,
    config_cls: type,
    *,
    needs_entropy: bool = False,
    keep_mask: Callable[..., torch.Tensor] | None = None,
    minibatch_overrides: Callable[..., dict[str, Any]] | None = None,
    needs_teacher: bool = False,
    denominator_mask: Callable[..., torch.Tensor] | None = None,
    policy_statistics: bool = False,
    select: Callable[..., list[torch.Tensor]] | None = None,
    action: str | None = None,
):
    """Decorator: add ``fn`` to the registry under ``name``. A duplicate name is an error."""

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered")
        if action is not None and (action not in ACTIONS or keep_mask is None):
            raise ValueError(f"objective {name!r}: action must be one of {sorted(ACTIONS)} with a keep mask")
        _REGISTRY[name] = Objective(name, fn, config_cls, needs_entropy, keep_mask, minibatch_overrides,
                                    needs_teacher, denominator_mask, policy_statistics, select, action)
        return fn

    return decorate


def get_objective(name: str) -> Objective:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; choose one of {', '.join(sorted(_REGISTRY))}") from None


def policy_loss(
    name: str,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    denominator: float | None = None,
    keep_mask: torch.Tensor | None = None,
    **overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute objective ``name``'s loss.

    Shapes: logprobs, old_logprobs, response_mask, entropy, ref_logprobs [B, T];
    advantages [B] or [B, T]. ``denominator``: the global unit count of the
    optimizer mini-batch (see ``stapo.objectives.aggregate``); None = this batch's own.
    ``keep_mask`` [B, T] (objectives with a keep mask only): the tokens that carry the
    loss, computed once by the caller; None = the objective computes it from its inputs.
    ``overrides`` change fields of the objective's config dataclass.
    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors.
    """
    obj = get_objective(name)
    return call_objective(obj, obj.config(**overrides), logprobs, old_logprobs, advantages, response_mask,
                          entropy=entropy, ref_logprobs=ref_logprobs, teacher_logprobs=teacher_logprobs,
                          denominator=denominator, keep_mask=keep_mask)


def call_objective(obj: Objective, cfg: Any, logprobs, old_logprobs, advantages, response_mask, *,
                   entropy=None, ref_logprobs=None, teacher_logprobs=None, denominator=None, keep_mask=None):
    """``policy_loss`` with an already built config ``cfg`` (the trainer builds it once per run)."""
    name = obj.name
    if obj.needs_entropy and entropy is None:
        raise ValueError(f"objective {name!r} needs per-token `entropy` [B, T]")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and response_mask must share a shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(response_mask.shape)}"
        )
    for field, value in (("entropy", entropy), ("ref_logprobs", ref_logprobs), ("keep_mask", keep_mask)):
        if value is not None and value.shape != logprobs.shape:
            raise ValueError(f"`{field}` shape {tuple(value.shape)} != logprobs shape {tuple(logprobs.shape)}")
    extra = {}
    if obj.needs_teacher:
        if teacher_logprobs is None:
            raise ValueError(f"objective {name!r} needs `teacher_logprobs` [B, T] from the privileged-context pass")
        extra["teacher_logprobs"] = teacher_logprobs
    if keep_mask is not None:
        if obj.keep_mask is None:
            raise ValueError(f"objective {name!r} has no keep mask; `keep_mask` must be None")
        extra["keep_mask"] = keep_mask.bool()
    return obj.fn(
        cfg,
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        entropy=entropy,
        ref_logprobs=ref_logprobs,
        denominator=denominator,
        **extra,
    )


def loss_token_mask(
    name: str,
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    **overrides,
) -> torch.Tensor:
    """The tokens objective ``name`` normalises over (``response_mask`` unless the objective masks)."""
    obj = get_objective(name)
    cfg = obj.config(**overrides)
    keep = objective_keep_mask(obj, cfg, logprobs, entropy, advantages, response_mask)
    return denominator_token_mask(obj, cfg, keep, response_mask)


def objective_keep_mask(obj: Objective, cfg: Any, logprobs, entropy, advantages, response_mask) -> torch.Tensor:
    """The tokens that carry objective ``obj``'s loss [B, T] bool (all valid tokens without a keep mask)."""
    if obj.keep_mask is None:
        return response_mask.bool()
    if obj.needs_entropy and entropy is None:
        raise ValueError(f"objective {obj.name!r} needs per-token `entropy` [B, T] for its loss mask")
    return obj.keep_mask(cfg, logprobs, entropy, advantages, response_mask)


def denominator_token_mask(obj: Objective, cfg: Any, keep: torch.Tensor, response_mask) -> torch.Tensor:
    """The tokens the loss is normalised over, given the keep mask [B, T]."""
    return keep if obj.denominator_mask is None else obj.denominator_mask(cfg, keep, response_mask)


def minibatch_overrides(name: str, stats: Sequence[TokenStats], gather=None, **overrides) -> dict[str, Any]:
    """Mini-batch-wide statistics of objective ``name`` (e.g. ``{"entropy_threshold": τ_h}``).

    ``stats`` lists the micro-batches of one optimizer mini-batch. ``gather``
    concatenates a 1-D tensor over ranks (identity when None).
    """
    obj = get_objective(name)
    if obj.minibatch_overrides is None:
        return {}
    if obj.needs_entropy and any(s.entropy is None for s in stats):
        raise ValueError(f"objective {name!r} needs per-token `entropy` in every TokenStats")
    return obj.minibatch_overrides(obj.config(**overrides), stats, gather)
