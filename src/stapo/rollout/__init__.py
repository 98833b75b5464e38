"""Rollout backends behind one interface, a registry that builds each from config, and collation."""

from .backends import BACKENDS, Backend, eval_generator, make_generator, register_backend, training_generator
from .base import Generation, Generator, SamplingConfig
from .collate import collate_rollouts
from .hf import HFGenerator

__all__ = [
    "BACKENDS",
    "Backend",
    "Generation",
    "Generator",
    "HFGenerator",
    "SamplingConfig",
    "collate_rollouts",
    "eval_generator",
    "make_generator",
    "register_backend",
    "training_generator",
]
