"""Group-relative advantages (outcome reward -> one advantage per response).

Shapes: rewards [N] with N = P·G, responses of one prompt contiguous; returns [N].
"""

from __future__ import annotations

import torch

ADVANTAGE_METHODS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo", eps: float = 1e-6):
    """Advantages of ``rewards`` within contiguous groups of ``group_size``.

    - ``grpo``:    (r − mean) / (std + eps), std with Bessel's correction (unbiased,
                   ``torch.std``'s default, as verl's GRPO estimator);
    - ``dr_grpo``: r − mean (Dr. GRPO drops the std division);
    - ``rloo``:    r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean)  (needs G ≥ 2).

    A group whose rewards are all equal gets advantage 0 under every method.
    Computed in float64 and returned in ``rewards``' float dtype.
    """
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"unknown advantage method {method!r}; choose one of {', '.join(ADVANTAGE_METHODS)}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group_size={group_size}")
    if method == "rloo" and group_size < 2:
        raise ValueError("rloo needs group_size >= 2 (the leave-one-out mean of one response is undefined)")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if method == "grpo":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        adv = centred / (std + eps)
    elif method == "dr_grpo":
        adv = centred
    else:
        adv = centred * group_size / (group_size - 1)
    # exact zeros for constant groups (float noise in mean() must not leak through 1/eps)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.view(-1).to(out_dtype)


__all__ = ["ADVANTAGE_METHODS", "group_advantages"]
