"""Each objective's config dataclass: its paper defaults, the one place they are written.

The S2T / 20-Entropy defaults (τ_p, q, the top ratio) are read from here by every signature that
takes them (``stapo.objectives.masks``, the TRL and verl integrations). Each option's allowed
values sit beside its default (``stapo.config.fields.option``) and are checked when a config is
built, from Python or from ``objective.options`` (verl's dual clip needs c > 1).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

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
# minibatch: Cov's means, the candidates and the count over the whole optimizer mini-batch (every
# micro-batch, every rank); microbatch: per micro-batch, as verl 0.9.1's clip_cov / kl_cov
UNUSED = (None,)  # an option the objective has no use for: only its null default is accepted


@dataclasses.dataclass(frozen=True)
class ClipCovConfig(ClipConfig):
    # "The Entropy Mechanism of RL for Reasoning LMs" (arXiv 2505.22617), as verl 0.9.1 ships it
    # (PolicyLossConfig, compute_policy_loss_clip_cov)
    clip_low: float = 0.2  # verl actor clip_ratio 0.2 (clip_cov's cliprange)
    clip_high: float = 0.2  # verl actor clip_ratio 0.2
    loss_agg_mode: str = "token-mean"  # verl actor default; the detached tokens stay in the denominator
    clip_cov_ratio: float = option(2e-4, gt=0, le=1)  # verl PolicyLossConfig.clip_cov_ratio: share r of tokens detached
    clip_cov_lb: float = option(1.0)  # verl PolicyLossConfig.clip_cov_lb: candidates have Cov > lb
    clip_cov_ub: float = option(5.0)  # verl PolicyLossConfig.clip_cov_ub: candidates have Cov < ub
    selection_scope: str = option("minibatch", choices=SELECTION_SCOPES)  # microbatch = verl's


@dataclasses.dataclass(frozen=True)
class KLCovConfig(ClipConfig):
    # same paper; verl 0.9.1 compute_policy_loss_kl_cov: the surrogate −A·ρ is not clipped there
    clipped: ClassVar[bool] = False  # the objective line says "no clip", not the unused clip options
    clip_low: float = 0.2  # unused: kl_cov does not clip (verl)
    clip_high: float = 0.2  # unused: kl_cov does not clip (verl)
    clip_ratio_c: float | None = option(None, choices=UNUSED)  # unused: kl_cov does not clip (verl)
    loss_agg_mode: str = "token-mean"  # verl actor default
    kl_cov_ratio: float = option(2e-4, gt=0, le=1)  # verl PolicyLossConfig.kl_cov_ratio: share k of tokens penalised
    ppo_kl_coef: float = option(0.1, ge=0)  # verl PolicyLossConfig.ppo_kl_coef: β of β·|log π − log π_old|
    selection_scope: str = option("minibatch", choices=SELECTION_SCOPES)  # microbatch = verl's


@dataclasses.dataclass(frozen=True)
class GSPOConfig(ClipConfig):
    clip_low: float = 3e-4  # GSPO (arXiv 2507.18071) Sec. 5.1: left clipping range 3e-4
    clip_high: float = 4e-4  # GSPO Sec. 5.1: right clipping range 4e-4
    loss_agg_mode: str = "seq-mean-token-mean"  # GSPO Eq. 5: a mean over sequences (verl's GSPO recommendation)


@dataclasses.dataclass(frozen=True)
class CISPOConfig(ClipConfig):
    clip_low: float = option(1.0, ge=0)  # MiniMax-M1 (arXiv 2506.13585) Sec. 3.1: no lower bound on the IS weight
    clip_high: float = 4.0  # weight <= 1 + 4 = 5: ScaleRL's ε_max (arXiv 2510.13786), TRL 1.16's advice for cispo
    clip_ratio_c: float | None = option(None, choices=UNUSED)  # unused: the weight is clipped, not the surrogate
    loss_agg_mode: str = "token-mean"  # MiniMax-M1 Eq. 3: 1 / Σ_i |o_i|
