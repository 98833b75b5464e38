"""stapo: stable RL fine-tuning of language models on verifiable rewards.

The flagship objective is STAPO (arXiv 2602.15620): a clip-higher, token-mean
objective with the S2T mask that silences rare spurious tokens.

The top-level names are imported lazily (PEP 562): reward worker processes are
started with ``spawn`` and import ``stapo.rewards``, which must not pull in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "group_advantages": "stapo.advantages",
    "RolloutBatch": "stapo.batch",
    "OBJECTIVES": "stapo.objectives",
    "agg_loss": "stapo.objectives",
    "high_entropy_mask": "stapo.objectives",
    "policy_loss": "stapo.objectives",
    "register_objective": "stapo.objectives",
    "s2t_mask": "stapo.objectives",
}

__all__ = [
    "OBJECTIVES",
    "RolloutBatch",
    "__version__",
    "agg_loss",
    "group_advantages",
    "high_entropy_mask",
    "policy_loss",
    "register_objective",
    "s2t_mask",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'stapo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
