"""Typed configuration (YAML + dotted overrides)."""

from .schema import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict
from .train import DEMO, PRESETS, TrainConfig, build_config

__all__ = [
    "DEMO",
    "PRESETS",
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "from_dict",
    "load_yaml",
    "merge",
    "to_dict",
]
