"""Group-relative advantages (outcome reward -> one advantage per response), chosen by name.

Shapes: rewards [N] with N = P·G, responses of one prompt contiguous; returns [N].

Each estimator is a pure function ``fn(r) -> adv`` of the float64 rewards viewed as [P, G],
registered with ``register_advantage`` (as objectives are with ``register_objective``);
``group_advantages`` does the checks, the dtype and the exact zeros of constant groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

_REGISTRY: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], int]] = {}
ADVANTAGES: Mapping[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], int]] = MappingProxyType(_REGISTRY)


def register_advantage(name: str, *, min_group_size: int = 1):
    """Decorator: add ``fn(r [P, G] float64, eps) -> [P, G]`` under ``name``. A duplicate is an error."""

    def decorate(fn):
        if name in _REGISTRY:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _REGISTRY[name] = (fn, min_group_size)
        return fn

    return decorate


@register_advantage("grpo")
def grpo(r: torch.Tensor, eps: float) -> torch.Tensor:
    """(r − mean) / (std + eps), std with Bessel's correction (``torch.std``'s default, as verl's GRPO)."""
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(centred)
    return centred / (std + eps)


@register_advantage("dr_grpo")
def dr_grpo(r: torch.Tensor, eps: float) -> torch.Tensor:
    """r − mean (Dr. GRPO drops the std division)."""
    return r - r.mean(dim=1, keepdim=True)


@register_advantage("rloo", min_group_size=2)
def rloo(r: torch.Tensor, eps: float) -> torch.Tensor:
    """r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean)."""
    g = r.shape[1]
    return (r - r.mean(dim=1, keepdim=True)) * g / (g - 1)


ADVANTAGE_METHODS = tuple(_REGISTRY)  # the built-in estimators ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo", eps: float = 1e-6):
    """Advantages of ``rewards`` within contiguous groups of ``group_size`` by estimator ``method``.

    - ``grpo``:    (r − mean) / (std + eps), std with Bessel's correction (unbiased,
                   ``torch.std``'s default, as verl's GRPO estimator);
    - ``dr_grpo``: r − mean (Dr. GRPO drops the std division);
    - ``rloo``:    r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean)  (needs G ≥ 2).

    A group whose rewards are all equal gets advantage 0 under every method.
    Computed in float64 and returned in ``rewards``' float dtype.
    """
    if method not in _REGISTRY:
        raise ValueError(f"unknown advantage method {method!r}; choose one of {', '.join(_REGISTRY)}")
    fn, min_group = _REGISTRY[method]
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group_size={group_size}")
    if group_size < min_group:
        raise ValueError(f"{method} needs group_size >= {min_group} (the leave-one-out mean of one response "
                         "is undefined)")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64).view(-1, group_size)
    adv = fn(r, eps)
    # exact zeros for constant groups (float noise in mean() must not leak through 1/eps)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.view(-1).to(out_dtype)


__all__ = ["ADVANTAGES", "ADVANTAGE_METHODS", "group_advantages", "register_advantage"]
