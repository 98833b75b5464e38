"""Built-in tasks by name: a name that stands for a model (``model.name_or_path``) and its problems
(``data.train``, ``data.heldout``). A package registers its tasks when imported (``stapo.demo``
registers "demo" and "demo_words"); the trainer looks names up here, never in the package itself.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

PROVIDERS = ("stapo.demo",)  # the packages that register built-in tasks (imported on first look-up)


@dataclasses.dataclass(frozen=True)
class BuiltinTask:
    name: str
    make_problems: Callable[..., list]  # (n, *, seed, split) -> list[Problem]
    build_model: Callable[..., Path]  # (cache_dir, *, seed, log) -> the base model's folder (built once)


_TASKS: dict[str, BuiltinTask] = {}
_loaded = False


def register_task(task: BuiltinTask) -> BuiltinTask:
    if task.name in _TASKS:
        raise ValueError(f"built-in task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def builtin_tasks() -> Mapping[str, BuiltinTask]:
    """Every registered task by name (the providers are imported the first time)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PROVIDERS:
            importlib.import_module(module)
    return MappingProxyType(_TASKS)


def builtin_task(name: str) -> BuiltinTask | None:
    """The task called ``name``, or None: the name is a path, hub id or dataset instead."""
    return builtin_tasks().get(name)
