"""stapo: stable RL fine-tuning of language models on verifiable rewards.

The flagship objective is STAPO (arXiv 2602.15620): a clip-higher, token-mean
objective with the S2T mask that silences rare spurious tokens.
"""

from .advantages import group_advantages
from .batch import RolloutBatch
from .objectives import (
    OBJECTIVES,
    agg_loss,
    high_entropy_mask,
    policy_loss,
    register_objective,
    s2t_mask,
)

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "RolloutBatch",
    "agg_loss",
    "group_advantages",
    "high_entropy_mask",
    "policy_loss",
    "register_objective",
    "s2t_mask",
    "__version__",
]
