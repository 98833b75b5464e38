"""Objectives by name (after verl's ``register_policy_loss``).

An objective is a pure function ``fn(cfg, logprobs, old_logprobs, advantages,
response_mask, *, entropy, ref_logprobs, denominator) -> (loss, metrics)`` plus a
config dataclass holding its paper defaults. Two optional hooks let the trainer
stay free of per-objective branches:

- ``loss_mask(cfg, logprobs, entropy, advantages, response_mask)``: the tokens
  the loss is normalised over (for the global token count under micro-batching);
- ``minibatch_overrides(cfg, stats, gather)``: statistics that must be taken over
  the whole optimizer mini-batch (e.g. τ_h), returned as config overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch


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
    loss_mask: Callable[..., torch.Tensor] | None = None
    minibatch_overrides: Callable[..., dict[str, Any]] | None = None
    needs_teacher: bool = False  # takes `teacher_logprobs` [B, T] (self-distillation objectives)

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
    loss_mask: Callable[..., torch.Tensor] | None = None,
    minibatch_overrides: Callable[..., dict[str, Any]] | None = None,
    needs_teacher: bool = False,
):
    """Decorator: add ``fn`` to the registry under ``name``. A duplicate name is an error."""

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered")
        _REGISTRY[name] = Objective(name, fn, config_cls, needs_entropy, loss_mask, minibatch_overrides,
                                    needs_teacher)
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
    **overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute objective ``name``'s loss.

    Shapes: logprobs, old_logprobs, response_mask, entropy, ref_logprobs [B, T];
    advantages [B] or [B, T]. ``denominator``: the global unit count of the
    optimizer mini-batch (see ``stapo.objectives.aggregate``); None = this batch's own.
    ``overrides`` change fields of the objective's config dataclass.
    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors.
    """
    obj = get_objective(name)
    cfg = obj.config(**overrides)
    if obj.needs_entropy and entropy is None:
        raise ValueError(f"objective {name!r} needs per-token `entropy` [B, T]")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and response_mask must share a shape, got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(response_mask.shape)}"
        )
    for field, value in (("entropy", entropy), ("ref_logprobs", ref_logprobs)):
        if value is not None and value.shape != logprobs.shape:
            raise ValueError(f"`{field}` shape {tuple(value.shape)} != logprobs shape {tuple(logprobs.shape)}")
    extra = {}
    if obj.needs_teacher:
        if teacher_logprobs is None:
            raise ValueError(f"objective {name!r} needs `teacher_logprobs` [B, T] from the privileged-context pass")
        extra["teacher_logprobs"] = teacher_logprobs
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
    if obj.loss_mask is None:
        return response_mask.bool()
    if obj.needs_entropy and entropy is None:
        raise ValueError(f"objective {name!r} needs per-token `entropy` [B, T] for its loss mask")
    return obj.loss_mask(obj.config(**overrides), logprobs, entropy, advantages, response_mask)


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
