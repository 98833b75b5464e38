"""Policy objectives: pure functions of tensors, chosen by name (``stapo.policy_loss``)."""

from . import dasd as _dasd  # noqa: F401  (registers dasd, opsd, dasd_reverse)
from . import losses as _losses  # noqa: F401  (registers the built-in objectives)
from .aggregate import AGG_MODES, agg_loss, count_units
from .configs import (
    CISPOConfig,
    ClipConfig,
    ClipCovConfig,
    DAPOConfig,
    DrGRPOConfig,
    Entropy20Config,
    GRPOConfig,
    GSPOConfig,
    JustRLConfig,
    KLCovConfig,
    STAPOConfig,
)
from .corrections import apply_tis, rollout_mismatch, tis_weights
from .dasd import DASDConfig, SelfDistillConfig, router_weight
from .losses import clipped_surrogate
from .masks import (
    high_entropy_mask,
    high_entropy_threshold,
    quantile,
    s2t_candidates,
    s2t_mask,
    s2t_threshold,
)
from .planner import MinibatchPlan, plan_minibatch
from .registry import (
    OBJECTIVES,
    Objective,
    TokenStats,
    get_objective,
    loss_token_mask,
    minibatch_overrides,
    policy_loss,
    register_objective,
)
from .training import STATISTICS, TrainingObjective, build_objective, objective_from_config

__all__ = [
    "AGG_MODES",
    "OBJECTIVES",
    "STATISTICS",
    "CISPOConfig",
    "ClipConfig",
    "ClipCovConfig",
    "DAPOConfig",
    "DASDConfig",
    "DrGRPOConfig",
    "Entropy20Config",
    "GRPOConfig",
    "GSPOConfig",
    "JustRLConfig",
    "KLCovConfig",
    "MinibatchPlan",
    "Objective",
    "STAPOConfig",
    "SelfDistillConfig",
    "TokenStats",
    "TrainingObjective",
    "agg_loss",
    "apply_tis",
    "build_objective",
    "clipped_surrogate",
    "count_units",
    "get_objective",
    "high_entropy_mask",
    "high_entropy_threshold",
    "loss_token_mask",
    "minibatch_overrides",
    "objective_from_config",
    "plan_minibatch",
    "policy_loss",
    "quantile",
    "register_objective",
    "rollout_mismatch",
    "router_weight",
    "s2t_candidates",
    "s2t_mask",
    "s2t_threshold",
    "tis_weights",
]
