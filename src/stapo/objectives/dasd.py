"""Self-distillation with a privileged self-teacher: DASD (arXiv 2605.22263) and two ablations.

The teacher is the policy itself with privileged information (a reference solution or the final
answer) in its prompt, scoring the student's own sampled tokens (``stapo.distill``). DASD folds the
teacher's token-level evidence into the advantage of the `justrl` clipped objective and sets the
*direction* of the teacher's pull per token from the student's entropy.

Notation (shapes): B sequences, T response tokens.
    logprobs, old_logprobs, teacher_logprobs, entropy, response_mask    [B, T]
    advantages (A_group)                                                [B] or [B, T]

    δ_t  = log π_old(y_t | x, hint, y_<t) − log π_old(y_t | x, y_<t)     evidence gap      [B, T]
    δ̄_t  = (δ_t − μ_δ) / σ_δ      μ_δ, σ_δ over the mini-batch's valid tokens            [B, T]
    τ_b  = q-quantile of row b's entropies;  σ_H,b = mean_t |H_bt − mean_t H_bt|        [B]
    ω_t  = tanh((τ_b − H_t) / σ_H,b) · sigmoid(|δ̄_t| − 1)               router           [B, T]
    Â_t  = A_group + β · ω_t · δ̄_t                                      token advantage  [B, T]
    loss = justrl's clipped surrogate (clip 0.2 / 0.28, dual clip 10, token-mean) with Â

ω > 0 attracts (Â rises where the teacher likes the token more than the student, δ̄ > 0, so the
update moves the student toward the teacher); ω < 0 repels. With q = 0.8 the top 20% of each
trajectory's entropies are repelled (our reading of the paper's ρ = 0.2).

Gradient: δ, δ̄, ω and Â are constants w.r.t. the parameters. The teacher pass runs without grad,
the student's side of δ is the rollout policy's ``old_logprobs`` (so teacher and student are the
same parameters, θ_old, in different contexts) and the entropy is detached; only the clipped
surrogate's ratio exp(logπ − logπ_old) carries gradient, exactly as in `justrl`.

Ablations: `opsd` sets ω ≡ 1 (plain on-policy self-distillation: always attract, no entropy
router, no |δ̄| gate); `dasd_reverse` flips the router's sign (ω → −ω).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config.fields import option, statistic
from .losses import LOG_RATIO_CLAMP, JustRLConfig, _clip_objective, _masked_mean
from .masks import expand_advantages
from .registry import register_objective

DELTA_NORMS = ("standardize", "none")


@dataclasses.dataclass(frozen=True)
class SelfDistillConfig(JustRLConfig):
    beta: float = 0.1  # β, weight of the teacher term in Â (issue 10's default; swept in benchmarks/dasd_demo.py)
    # "standardize": δ̄ = (δ − μ_δ) / σ_δ over the mini-batch's valid tokens (stapo's default); "none": δ̄ = δ
    delta_norm: str = option("standardize", choices=DELTA_NORMS)
    # μ_δ, σ_δ of the whole optimizer mini-batch (set by the trainer via ``minibatch_overrides``);
    # None = this batch's own, which makes the result depend on the micro-batch split
    delta_mean: float | None = statistic()
    delta_std: float | None = statistic()


@dataclasses.dataclass(frozen=True)
class DASDConfig(SelfDistillConfig):
    # τ: per-trajectory entropy quantile; tokens above it are repelled. 0.8 = "top 20% pushed away",
    # stapo's reading of the paper's ρ = 0.2 (a setting because the paper's exact rule is not public)
    router_quantile: float = option(0.8, ge=0, le=1)
    mad_eps: float = option(1e-6, gt=0)  # floor of σ_H, so a trajectory with equal entropies gets ω = 0, not 0/0


# --- the evidence gap and its normalisation -------------------------------------------------------

def evidence_gap(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                 response_mask: torch.Tensor) -> torch.Tensor:
    """δ [B, T] float64 = teacher − student log-prob of the sampled token; 0 off the mask, no grad."""
    valid = response_mask.bool()
    delta = teacher_logprobs.detach().to(torch.float64) - old_logprobs.detach().to(torch.float64)
    # where, not *: padded positions may hold -inf/NaN (see losses._clip_objective)
    return torch.where(valid, delta, torch.zeros((), dtype=torch.float64, device=delta.device))


def gap_moments(pairs, gather=None) -> tuple[float, float]:
    """(μ_δ, σ_δ) over all valid tokens of ``pairs`` = [(δ [B, T], response_mask [B, T]), ...].

    Sums, not per-piece means, so any split of a mini-batch (micro-batches, ranks) gives the same
    moments; ``gather`` concatenates a 1-D tensor over ranks (identity when None). σ is the
    population standard deviation. No valid token: (0, 1), which leaves δ unchanged.
    """
    local = torch.zeros(3, dtype=torch.float64)  # [Σδ, Σδ², n]
    for delta, mask in pairs:
        d = delta.detach().to(torch.float64)[mask.bool()].cpu()
        local += torch.stack([d.sum(), (d * d).sum(), torch.tensor(float(d.numel()), dtype=torch.float64)])
    total = local if gather is None else gather(local).view(-1, 3).sum(0)
    s, ss, n = (float(x) for x in total)
    if n == 0:
        return 0.0, 1.0
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)  # float64 sums: cancellation is negligible at log-prob scales
    return mean, math.sqrt(var)


def normalise_gap(delta: torch.Tensor, response_mask: torch.Tensor, cfg: SelfDistillConfig) -> torch.Tensor:
    """δ̄ [B, T] (0 off the mask) under ``cfg.delta_norm``, with the mini-batch moments when given."""
    if cfg.delta_norm == "none":
        return delta
    mean, std = cfg.delta_mean, cfg.delta_std
    if mean is None or std is None:
        mean, std = gap_moments([(delta, response_mask)])
    out = (delta - mean) / max(std, 1e-8)  # σ = 0: every δ equals μ, so δ̄ = 0
    return torch.where(response_mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# --- the entropy router ---------------------------------------------------------------------------

def entropy_direction(entropy: torch.Tensor, response_mask: torch.Tensor, quantile: float = 0.8,
                      eps: float = 1e-6) -> torch.Tensor:
    """tanh((τ_b − H_t) / σ_H,b) [B, T] float64: +1 (attract) at low entropy, −1 (repel) at high; 0 off the mask.

    τ_b is the linear-interpolation ``quantile`` of row b's valid entropies (as ``torch.quantile``)
    and σ_H,b their mean absolute deviation around the row mean. Both are per trajectory, so the
    router does not depend on how rows are grouped into micro-batches.
    """
    valid = response_mask.bool()
    nan = torch.full((), float("nan"), dtype=torch.float64, device=entropy.device)
    h = torch.where(valid, entropy.detach().to(torch.float64), nan)  # [B, T], NaN = not a token
    tau = torch.nanquantile(h, quantile, dim=-1, keepdim=True)  # [B, 1]; NaN for an empty row
    mad = (h - h.nanmean(dim=-1, keepdim=True)).abs().nanmean(dim=-1, keepdim=True)  # [B, 1]
    direction = torch.tanh((tau - h) / mad.clamp(min=eps))  # [B, T]
    return torch.where(valid, direction, torch.zeros((), dtype=torch.float64, device=entropy.device))


def magnitude_gate(delta_bar: torch.Tensor) -> torch.Tensor:
    """sigmoid(|δ̄| − 1) [B, T]: a token whose evidence gap is beyond one σ gets more than half weight."""
    return torch.sigmoid(delta_bar.abs() - 1.0)


def router_weight(entropy: torch.Tensor, delta_bar: torch.Tensor, response_mask: torch.Tensor,
                  quantile: float = 0.8, eps: float = 1e-6) -> torch.Tensor:
    """ω [B, T] float64 = tanh((τ − H) / σ_H) · sigmoid(|δ̄| − 1); ω > 0 attracts, ω < 0 repels."""
    omega = entropy_direction(entropy, response_mask, quantile, eps) * magnitude_gate(delta_bar.to(torch.float64))
    return torch.where(response_mask.bool(), omega, torch.zeros((), dtype=torch.float64, device=omega.device))


# --- the objectives --------------------------------------------------------------------------------

def distill_advantages(advantages, delta_bar, omega, beta: float, like: torch.Tensor) -> torch.Tensor:
    """Â [B, T] = A_group + β · ω · δ̄, in ``like``'s dtype (β = 0 gives A exactly)."""
    adv = expand_advantages(advantages, like).detach().to(torch.float64)
    return (adv + beta * (omega * delta_bar)).to(like.dtype)


def _self_distill(cfg, omega_fn, logprobs, old_logprobs, advantages, response_mask, *, entropy,
                  teacher_logprobs, **kw):
    """Shared body: δ̄ and ω (constants), Â, then the `justrl` clipped surrogate on Â."""
    if teacher_logprobs.shape != logprobs.shape:
        raise ValueError(f"`teacher_logprobs` shape {tuple(teacher_logprobs.shape)} != logprobs shape "
                         f"{tuple(logprobs.shape)}")
    valid = response_mask.bool()
    delta = evidence_gap(teacher_logprobs, old_logprobs, response_mask)  # [B, T]
    delta_bar = normalise_gap(delta, response_mask, cfg)  # [B, T]
    omega = omega_fn(delta_bar)  # [B, T], 0 off the mask
    adv = distill_advantages(advantages, delta_bar, omega, cfg.beta, logprobs)  # [B, T]
    loss, metrics = _clip_objective(cfg, logprobs, old_logprobs, adv, response_mask, entropy=entropy, **kw)
    d = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics |= {
        "distill/attract_fraction": _masked_mean(omega > 0, valid),
        "distill/repel_fraction": _masked_mean(omega < 0, valid),
        "distill/delta_mean": _masked_mean(delta, valid),
        "distill/delta_bar_mean": _masked_mean(delta_bar, valid),
        "distill/omega_mean": _masked_mean(omega, valid),
        # k3 estimate of KL(π_student || π_teacher) on the student's samples: e^δ − 1 − δ ≥ 0
        "distill/kl_teacher": _masked_mean(torch.expm1(d) - d, valid),
    }
    return loss, metrics


def _gap_overrides(cfg, stats, gather):
    """μ_δ, σ_δ over the whole optimizer mini-batch, so micro-batching does not change δ̄.

    The student's side is the rollout policy's log-prob (``TokenStats.old_logprobs``; when a
    caller leaves it out, ``TokenStats.logprobs``), the same one the per-token δ in the loss uses.
    """
    if cfg.delta_norm == "none":
        return {}
    if any(s.teacher_logprobs is None for s in stats):
        raise ValueError("self-distillation objectives need `teacher_logprobs` in every TokenStats "
                         "(run stapo.distill.compute_teacher_logprobs before the update)")
    pairs = [(evidence_gap(s.teacher_logprobs, s.logprobs if s.old_logprobs is None else s.old_logprobs,
                           s.response_mask), s.response_mask) for s in stats]
    mean, std = gap_moments(pairs, gather)
    return {"delta_mean": mean, "delta_std": std}


_SELF_DISTILL = {"minibatch_overrides": _gap_overrides, "needs_teacher": True}


@register_objective("dasd", DASDConfig, needs_entropy=True, **_SELF_DISTILL)
def dasd(cfg, logprobs, old_logprobs, advantages, response_mask, *, entropy, **kw):
    """DASD: Â = A + β·ω·δ̄ with the entropy router ω (attract low-entropy, repel high-entropy tokens)."""
    def omega(delta_bar):
        return router_weight(entropy, delta_bar, response_mask, cfg.router_quantile, cfg.mad_eps)
    return _self_distill(cfg, omega, logprobs, old_logprobs, advantages, response_mask, entropy=entropy, **kw)


@register_objective("dasd_reverse", DASDConfig, needs_entropy=True, **_SELF_DISTILL)
def dasd_reverse(cfg, logprobs, old_logprobs, advantages, response_mask, *, entropy, **kw):
    """Ablation: DASD with the direction swapped (repel low-entropy, attract high-entropy tokens)."""
    def omega(delta_bar):
        return -router_weight(entropy, delta_bar, response_mask, cfg.router_quantile, cfg.mad_eps)
    return _self_distill(cfg, omega, logprobs, old_logprobs, advantages, response_mask, entropy=entropy, **kw)


@register_objective("opsd", SelfDistillConfig, **_SELF_DISTILL)
def opsd(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """Ablation: plain on-policy self-distillation, ω ≡ 1 (every token attracted to the teacher)."""
    def omega(delta_bar):
        return torch.where(response_mask.bool(), 1.0, 0.0).to(torch.float64)
    return _self_distill(cfg, omega, logprobs, old_logprobs, advantages, response_mask, **kw)
