"""Each objective's config dataclass: its paper defaults, the one place they are written.

The S2T / 20-Entropy defaults (τ_p, q, the top ratio) are read from here by every signature that
takes them (``stapo.objectives.masks``, the TRL and verl integrations). Each option's allowed
values sit beside its default (``stapo.config.fields.option``) and are checked when a config is
built, from Python or from ``objective.options`` (verl's dual clip needs c > 1).
"""

from __future__ import annotations

import dataclasses

from ..config.fields import check_fields, option, statistic
from .aggregate import AGG_MODES


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    clip_low: float = option(0.2, ge=0, lt=1)
    clip_high: float = option(0.2, ge=0)
    clip_ratio_c: float | None = option(None, gt=1)  # dual-clip constant for A < 0; None = off
    loss_agg_mode: str = option("token-mean", choices=AGG_MODES)
    kl_coef: float = option(0.0, ge=0)  # β of the k3 KL to a reference policy; 0 = no reference needed
    norm_length: int | None = option(None, ge=1)  # L of seq-mean-token-sum-norm; None = T (stapo train: max_new_tokens)

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ClipConfig):
    loss_agg_mode: str = "seq-mean-token-mean"  # DeepSeekMath Eq. 3: 1/|o_i| inside, 1/G outside


@dataclasses.dataclass(frozen=True)
class DAPOConfig(ClipConfig):
    clip_high: float = 0.28  # DAPO Sec. 3.1 clip-higher
    loss_agg_mode: str = "token-mean"  # DAPO Sec. 3.3


@dataclasses.dataclass(frozen=True)
class DrGRPOConfig(ClipConfig):
    loss_agg_mode: str = "seq-mean-token-sum-norm"  # Dr. GRPO: a constant, not |o_i|


@dataclasses.dataclass(frozen=True)
class JustRLConfig(ClipConfig):
    clip_high: float = 0.28
    clip_ratio_c: float | None = 10.0  # JustRL keeps verl's dual clip at 10
    loss_agg_mode: str = "token-mean"


@dataclasses.dataclass(frozen=True)
class Entropy20Config(JustRLConfig):
    top_ratio: float = option(0.2, gt=0, le=1)
    # "selected": divide by the kept tokens (the released code); "all": by all valid tokens
    # (the paper's formula). "selected" is the default so a kept token gets the same step
    # as under the `justrl` baseline it ablates, and it reproduces the published runs.
    normalize_by: str = option("selected", choices=("selected", "all"))
    entropy_threshold: float | None = statistic()  # mini-batch-wide cut; None = this batch's own


@dataclasses.dataclass(frozen=True)
class STAPOConfig(JustRLConfig):
    prob_threshold: float = option(0.002, ge=0, le=1)  # τ_p (0: no candidates, exactly justrl)
    entropy_quantile: float = option(0.75, ge=0, le=1)  # q
    entropy_threshold: float | None = statistic()  # τ_h from the whole mini-batch; None = this batch's own


SELECTION_SCOPES = ("minibatch", "microbatch")


@dataclasses.dataclass(frozen=True)
class ClipCovConfig(ClipConfig):
    # "The Entropy Mechanism of RL for Reasoning LMs" (arXiv 2505.22617) as verl 0.9.1 ships it
    # (PolicyLossConfig / compute_policy_loss_clip_cov): clip ε 0.2 both sides (verl's clip_ratio),
    # token-mean (verl's actor default), no dual clip (verl's clip_cov has none)
    clip_cov_ratio: float = option(2e-4, gt=0, le=1)  # verl PolicyLossConfig.clip_cov_ratio, the paper's r
    clip_cov_lb: float = option(1.0)  # verl PolicyLossConfig.clip_cov_lb: covariance lower bound ω_low
    clip_cov_ub: float = option(5.0)  # verl PolicyLossConfig.clip_cov_ub: covariance upper bound ω_high
    # minibatch: covariance means, candidates and count over the whole optimizer mini-batch (all
    # micro-batches and ranks); microbatch: per micro-batch, as verl
    selection_scope: str = option("minibatch", choices=SELECTION_SCOPES)


@dataclasses.dataclass(frozen=True)
class KLCovConfig(ClipConfig):
    # same paper and verl function (compute_policy_loss_kl_cov): the surrogate −A·ρ is not clipped
    # there, so clip_low / clip_high / clip_ratio_c are unused
    kl_cov_ratio: float = option(2e-4, gt=0, le=1)  # verl PolicyLossConfig.kl_cov_ratio, the paper's k
    ppo_kl_coef: float = option(0.1, ge=0)  # verl PolicyLossConfig.ppo_kl_coef, the paper's β
    selection_scope: str = option("minibatch", choices=SELECTION_SCOPES)


@dataclasses.dataclass(frozen=True)
class GSPOConfig(ClipConfig):
    clip_low: float = 3e-4  # GSPO (arXiv 2507.18071) Sec. 5.1: left clipping range 3e-4
    clip_high: float = 4e-4  # ... right clipping range 4e-4
    loss_agg_mode: str = "seq-mean-token-mean"  # GSPO Eq. 5: 1/G Σ_i over sequences (verl's GSPO default)


@dataclasses.dataclass(frozen=True)
class CISPOConfig(ClipConfig):
    # MiniMax-M1 (arXiv 2506.13585) Sec. 3.1: no lower bound on the IS weight (ε_low large): 1 − 1 = 0
    clip_low: float = option(1.0, ge=0)
    # ε_max = 1 + clip_high = 5: ScaleRL (arXiv 2510.13786), the value TRL 1.16 recommends for cispo
    clip_high: float = 4.0
    loss_agg_mode: str = "token-mean"  # MiniMax-M1 Eq. 3: 1 / Σ_i |o_i|
