"""Rollout backends by name; each builds its own keyword arguments from the training or eval config.

    generator = training_generator(cfg, model, tokenizer, ctx)   # `stapo train`: cfg.rollout.backend
    generator = eval_generator(settings, model, tokenizer)       # `stapo eval`:  settings.backend

A backend is registered with a loader (imports its class only when used: vLLM is an optional
extra) and two functions from config to the class's keyword arguments, so no caller branches on
the backend's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], type]  # the Generator class (imported lazily)
    train_kwargs: Callable[[Any, Any], dict]  # (TrainConfig, DistContext) -> constructor kwargs
    eval_kwargs: Callable[[Any], dict]  # EvalSettings -> constructor kwargs


_BACKENDS: dict[str, Backend] = {}
BACKENDS: Mapping[str, Backend] = MappingProxyType(_BACKENDS)


def register_backend(backend: Backend) -> Backend:
    if backend.name in _BACKENDS:
        raise ValueError(f"rollout backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown rollout backend {name!r}; choose one of {', '.join(map(repr, _BACKENDS))}") from None


def make_generator(backend: str, model, tokenizer, **kwargs):
    """The generation backend by name: ``hf`` (default) or ``vllm`` (needs the `vllm` extra)."""
    return get_backend(backend).load()(model, tokenizer, **kwargs)


def training_generator(cfg, model, tokenizer, ctx):
    """The trainer's generator for ``cfg.rollout.backend``, with its kwargs from ``cfg``."""
    backend = get_backend(cfg.rollout.backend)
    return backend.load()(model, tokenizer, **backend.train_kwargs(cfg, ctx))


def eval_generator(settings, model, tokenizer):
    """``stapo eval``'s generator for ``settings.backend``, with its kwargs from ``settings``."""
    backend = get_backend(settings.backend)
    return backend.load()(model, tokenizer, **backend.eval_kwargs(settings))


def _hf():
    from .hf import HFGenerator

    return HFGenerator


def _vllm():
    from .vllm import VLLMGenerator  # vLLM itself is imported when the engine starts (INSTALL_HINT if absent)

    return VLLMGenerator


register_backend(Backend(
    "hf", _hf,
    # FSDP2 shards the weights: every rank must run the same number of forward passes
    train_kwargs=lambda cfg, ctx: {"batch_size": cfg.rollout.generation_batch_size,
                                   "synced_gpus": ctx.strategy == "fsdp2"},
    eval_kwargs=lambda settings: {"batch_size": settings.batch_size},
))
register_backend(Backend(
    "vllm", _vllm,
    train_kwargs=lambda cfg, ctx: dict(cfg.rollout.vllm),  # `rollout.vllm:` goes to the engine as is
    eval_kwargs=lambda settings: {},
))
