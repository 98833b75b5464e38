"""Corrections for a rollout engine that is not the trainer's policy (vLLM): its mismatch and TIS.

The engine samples from π_rollout; the loss assumes π_train (the trainer's ``old_logprobs``).
``rollout_mismatch`` measures the gap; truncated importance sampling (TIS, as verl; Yao et al.
2025) corrects for it by weighting each token's policy-gradient term by min(π_train / π_rollout, C).
``apply_tis`` folds the weights into new [B, T] advantages: the clipped surrogate of every
objective is linear in A for a fixed ratio, so A·w scales each token's loss by the same positive w.

Shapes: B = responses in the batch, T = response length (right-padded).
"""

from __future__ import annotations

import math

import torch

from .masks import expand_advantages


def rollout_mismatch(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mean and max of |log π_train − log π_rollout| over the response tokens of a step.

    train_logprobs, rollout_logprobs, response_mask: [B, T]. Padded positions (mask False) may hold
    anything. Returns detached 0-dim float32 tensors ``rollout/logprob_diff_mean`` and
    ``rollout/logprob_diff_max`` (both 0 when the mask is empty). The gap measures how far the
    engine's sampler is from the policy the loss assumes (kernels, precision, stale weights).
    """
    if not (train_logprobs.shape == rollout_logprobs.shape == response_mask.shape):
        raise ValueError(
            f"rollout_mismatch: train_logprobs {tuple(train_logprobs.shape)}, rollout_logprobs "
            f"{tuple(rollout_logprobs.shape)} and response_mask {tuple(response_mask.shape)} must match"
        )
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    diff = torch.where(mask, (train_logprobs.float() - rollout_logprobs.float()).abs(), zero)  # [B, T]
    n = mask.sum()
    mean = diff.sum() / n.clamp(min=1)
    top = diff.max() if diff.numel() else zero  # |Δ| ≥ 0, so the zeros at padding never win
    return {"rollout/logprob_diff_mean": mean.detach(), "rollout/logprob_diff_max": top.detach()}


def tis_weights(
    train_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    cap: float,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Truncated importance-sampling weights min(π_train / π_rollout, cap), detached. [B, T].

    As verl's TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"): the rollout engine samples from π_rollout, the loss assumes π_train (the trainer's
    old log-probs), so each token's policy-gradient term is reweighted by the ratio, truncated
    from above at ``cap`` to bound the variance. No gradient flows through the weight.

    train_logprobs, rollout_logprobs: [B, T]. ``response_mask`` [B, T] (optional) sets padded
    positions to weight 1, so garbage there (-inf, NaN) cannot leak into a masked loss.
    """
    if not cap > 0:  # also rejects NaN
        raise ValueError(f"tis cap must be > 0, got {cap!r}")
    if train_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(
            f"tis_weights: train_logprobs {tuple(train_logprobs.shape)} and rollout_logprobs "
            f"{tuple(rollout_logprobs.shape)} must match"
        )
    log_ratio = (train_logprobs - rollout_logprobs).detach()  # [B, T]
    # min(exp(x), C) = exp(min(x, log C)): identical, and exp never overflows
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
    if response_mask is not None:
        weights = torch.where(response_mask.bool(), weights, torch.ones((), dtype=weights.dtype))
    return weights


def apply_tis(batch, cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """TIS advantages: ``batch.advantages`` expanded to [B, T] × ``tis_weights`` (needs ``rollout_logprobs``).

    Returns ``(advantages [B, T], {"rollout/tis_weight_mean": mean weight over response tokens})``;
    ``batch`` is left as it was (the caller hands the new advantages on).
    """
    if batch.rollout_logprobs is None:
        raise ValueError("TIS needs the rollout engine's log-probs (batch.rollout_logprobs); the hf backend has none")
    w = tis_weights(batch.old_logprobs, batch.rollout_logprobs, cap, batch.response_mask)  # [B, T]
    advantages = expand_advantages(batch.advantages, w) * w
    mask = batch.response_mask
    return advantages, {"rollout/tis_weight_mean": float(w[mask].mean()) if mask.any() else 1.0}
