"""The paper's unified token-level framework (STAPO, arXiv 2602.15620, Sec. 3) as pure tensor functions.

Notation. One response position has logits z ∈ R^V, policy π = softmax(z), and a
sampled token k with probability p = π_k and entropy H = −Σ_v π_v log π_v. The
token's surrogate contributes J = w · log π_k to the objective, where w = ρ·A while
the clipped surrogate is active and w = 0 once the clip binds (ρ = π/π_old).

    ∇_z J = w (e_k − π)                                        (softmax score)
    ‖∇_z J‖² = w² [(1 − p)² + Σ_{v≠k} π_v²] = w² (1 − 2p + Σ_v π_v²)
    w² (1 − 2p + e^{−H}) ≤ ‖∇_z J‖² ≤ w² (2 − 2p − C_V H²),   C_V = (|V|−1) / (|V| (ln |V|)²)

The lower bound is Rényi-2 ≤ Shannon entropy (Σπ² = e^{−H₂} ≥ e^{−H}); the upper
bound is tight at the uniform distribution.

Entropy change, sign convention: ΔH > 0 means the step *raises* the entropy. A
gradient-*ascent* step of size η on J = A·log π_k moves the logits by
Δz = η A (e_k − π). With ∂H/∂z_j = −π_j (log π_j + H), to first order

    ΔH_exact = ∇_z H · Δz = −η A [p (log p + H) − Σ_j π_j² (log π_j + H)]
             = −η A [p (log p + H) − (Σ_j π_j² log π_j + H Σ_j π_j²)].

The paper's criterion ("a positive-advantage token raises entropy iff p < e^{−H}")
is the same first-order change for the *natural*-gradient step: the Fisher of the
softmax is diag(π) − ππᵀ, and Δz = η A e_k / p solves it, giving

    ΔH_natural = −η A (log p + H)      (> 0 for A > 0  ⇔  p < e^{−H}).

Shapes: every per-token function is elementwise, so any shape works; the trainer
uses [B, T]. ``logit_stats`` takes logits [..., V] and returns [...] tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..objectives.losses import LOG_RATIO_CLAMP

__all__ = [
    "LogitStats",
    "collision_bound_constant",
    "entropy_change_exact",
    "entropy_change_natural",
    "grad_norm_sq_bounds",
    "logit_grad_norm",
    "logit_grad_norm_sq",
    "logit_stats",
    "raises_entropy_paper",
    "surrogate_weight",
]


class LogitStats(NamedTuple):
    """Per-position vocabulary sums, each shaped like the logits without the vocabulary axis."""

    logprobs: torch.Tensor | None  # log π_k of the given token ids (None when no ids were given)
    entropy: torch.Tensor  # H = −Σ π log π
    collision: torch.Tensor  # Σ π²  (collision probability)
    p2logp: torch.Tensor  # Σ π² log π  (only the exact entropy change needs it)


@torch.no_grad()
def logit_stats(
    logits: torch.Tensor,
    token_ids: torch.Tensor | None = None,
    *,
    chunk_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> LogitStats:
    """Entropy, Σπ², Σπ² log π (and log π_k) from logits [..., V], ``chunk_size`` positions at a time.

    ``stapo.ops.token_stats`` returns log π_k, H and Σπ² in the trainer's fused pass;
    this reference version adds Σπ² log π, which ``entropy_change_exact`` needs. It
    materialises at most [chunk_size, V] probabilities in ``dtype`` at once, so it
    can run on a [B, T, V] logits tensor without a [B, T, V] float copy.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary axis, got shape {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    flat = logits.detach().reshape(-1, logits.shape[-1])  # [N, V]
    ids = None
    if token_ids is not None:
        if token_ids.shape != lead:
            raise ValueError(f"token_ids shape {tuple(token_ids.shape)} != logits shape without V {tuple(lead)}")
        ids = token_ids.reshape(-1, 1).long()  # [N, 1]
    outs: dict[str, list[torch.Tensor]] = {"lp": [], "h": [], "c": [], "s": []}
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].to(dtype), dim=-1)  # [n, V]
        prob = logp.exp()
        # π log π and π² log π are 0 where π underflows to 0 (the limit), not NaN from 0·(−inf)
        plogp = torch.where(prob > 0, prob * logp, torch.zeros((), dtype=dtype, device=prob.device))
        outs["h"].append(-plogp.sum(-1))
        outs["c"].append((prob * prob).sum(-1))
        outs["s"].append((prob * plogp).sum(-1))
        if ids is not None:
            outs["lp"].append(logp.gather(-1, ids[start : start + chunk_size]).squeeze(-1))

    def cat(key):
        parts = outs[key]
        return (torch.cat(parts) if parts else flat.new_zeros(0, dtype=dtype)).reshape(lead)

    return LogitStats(cat("lp") if ids is not None else None, cat("h"), cat("c"), cat("s"))


def _advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A as float64 shaped like ``like``: [B] against [B, T] is per sequence, otherwise elementwise."""
    adv = torch.as_tensor(advantages).detach().to(torch.float64)
    if adv.shape == like.shape:
        return adv
    if adv.dim() == 1 and like.dim() == 2 and adv.shape[0] == like.shape[0]:
        return adv.unsqueeze(-1).expand_as(like)  # [B] -> [B, T]
    raise ValueError(f"advantages shape {tuple(adv.shape)} does not match logprobs shape {tuple(like.shape)}")


def surrogate_weight(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
) -> torch.Tensor:
    """w [B, T] such that ∂(−loss)/∂ log π_k = w for the clipped surrogate of ``stapo.objectives``.

    w = ρA where the surrogate is active, 0 where a clip binds:
    A > 0 and ρ > 1 + ε_high; A < 0 and ρ < 1 − ε_low; A < 0 and max(ρ, clip(ρ)) > c (dual clip);
    |log ρ| beyond the loss's clamp (the clamp has zero gradient there). Float64 out.
    """
    adv = _advantages(advantages, logprobs)  # [B, T]
    log_ratio = logprobs.detach().to(torch.float64) - old_logprobs.detach().to(torch.float64)
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # as clipped_surrogate
    clipped = (adv > 0) & (ratio > 1.0 + clip_high)
    clipped |= (adv < 0) & (ratio < 1.0 - clip_low)
    if clip_ratio_c is not None:
        clipped |= (adv < 0) & (torch.maximum(ratio, ratio.clamp(1.0 - clip_low, 1.0 + clip_high)) > clip_ratio_c)
    clipped |= log_ratio.abs() > LOG_RATIO_CLAMP
    return torch.where(clipped, torch.zeros_like(ratio), ratio * adv)


def collision_bound_constant(vocab_size: int) -> float:
    """C_V = (|V| − 1) / (|V| (ln |V|)²), the constant of the upper bound (|V| ≥ 2)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 for the gradient-norm bounds, got {vocab_size}")
    return (vocab_size - 1) / (vocab_size * math.log(vocab_size) ** 2)


def logit_grad_norm_sq(weight: torch.Tensor, prob: torch.Tensor, collision: torch.Tensor) -> torch.Tensor:
    """‖∇_z J‖² = w² (1 − 2p + Σπ²), elementwise, float64.

    The bracket is ‖e_k − π‖² ≥ 0; it is clamped at 0 because 1 − 2p + Σπ² cancels
    catastrophically as p → 1 and float32 Σπ² can then round below 2p − 1.
    """
    w = weight.to(torch.float64)
    bracket = 1.0 - 2.0 * prob.to(torch.float64) + collision.to(torch.float64)
    return w * w * bracket.clamp(min=0.0)


def logit_grad_norm(weight: torch.Tensor, prob: torch.Tensor, collision: torch.Tensor) -> torch.Tensor:
    """‖∇_z J‖ (see ``logit_grad_norm_sq``)."""
    return logit_grad_norm_sq(weight, prob, collision).sqrt()


def grad_norm_sq_bounds(
    weight: torch.Tensor, prob: torch.Tensor, entropy: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) = w²(1 − 2p + e^{−H}), w²(2 − 2p − C_V H²): bounds on ‖∇_z J‖² from p and H only."""
    w2 = weight.to(torch.float64) ** 2
    p = prob.to(torch.float64)
    h = entropy.to(torch.float64)
    lower = w2 * (1.0 - 2.0 * p + torch.exp(-h))
    upper = w2 * (2.0 - 2.0 * p - collision_bound_constant(vocab_size) * h * h)
    return lower, upper


def entropy_change_exact(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    p2logp: torch.Tensor,
    advantages: torch.Tensor,
    eta: float = 1.0,
) -> torch.Tensor:
    """First-order ΔH of a plain gradient-ascent step η on J = A·log π_k at the logits (> 0 = entropy up).

    ΔH = −η A [p (log p + H) − (Σπ² log π + H Σπ²)]. Float64 out, shaped like ``logprobs``;
    ``advantages`` may be [B] (broadcast over T) or shaped like ``logprobs``.
    """
    lp = logprobs.detach().to(torch.float64)
    h = entropy.detach().to(torch.float64)
    adv = _advantages(advantages, lp)
    inner = lp.exp() * (lp + h) - (p2logp.detach().to(torch.float64) + h * collision.detach().to(torch.float64))
    return -eta * adv * inner


def entropy_change_natural(
    logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, eta: float = 1.0
) -> torch.Tensor:
    """First-order ΔH of a natural-gradient step (Δz = ηA e_k / p): −η A (log p + H). The paper's criterion."""
    lp = logprobs.detach().to(torch.float64)
    adv = _advantages(advantages, lp)
    return -eta * adv * (lp + entropy.detach().to(torch.float64))


def raises_entropy_paper(logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """The paper's criterion for a positive-advantage token: p < e^{−H}, i.e. log p + H < 0 (bool)."""
    return (logprobs.detach().to(torch.float64) + entropy.detach().to(torch.float64)) < 0
