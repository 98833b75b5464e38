"""Typed configuration (YAML + dotted overrides)."""

from .dtypes import DTYPES, canonical_dtype, torch_dtype
from .objective import PAPER_OBJECTIVES, objective_line
from .schema import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict
from .train import DEMO, TrainConfig, build_config

__all__ = [
    "DEMO",
    "DTYPES",
    "PAPER_OBJECTIVES",
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "canonical_dtype",
    "from_dict",
    "load_yaml",
    "merge",
    "objective_line",
    "to_dict",
    "torch_dtype",
]
