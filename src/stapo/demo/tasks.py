"""The built-in demo tasks by name: the name goes in ``model.name_or_path``, ``data.train`` and ``data.heldout``.

- ``demo``: bare arithmetic solutions (``stapo.demo.task``), a 73-token vocabulary. Fast; RL learns,
  but S2T's mask almost never fires (no low-probability token survives in a correct response).
- ``demo_words``: the same problems with worded solutions (``stapo.demo.words``), a 2,048-token BPE
  with a MATH-text tail, and a junk-tolerant warm start: STAPO's regime, where S2T silences ~1e-4 of tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import task, words


@dataclasses.dataclass(frozen=True)
class DemoTask:
    name: str
    make_problems: Callable  # (n, seed, split, *, max_operand, distinct) -> list[Problem]
    max_new_tokens: int  # rollout length budget: the longest reference solution + EOS, with slack
    base: dict[str, Any]  # BaseModelSettings overrides of this task's base model


TASKS: dict[str, DemoTask] = {
    "demo": DemoTask("demo", task.make_problems, 48, {}),
    "demo_words": DemoTask(
        "demo_words",
        words.make_problems,
        64,
        {"vocab_size": 2048, "math_text_problems": 2000, "junk_rate": 0.02},
    ),
}


def get_task(name: str) -> DemoTask:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def build_model(name: str, cache_dir, *, seed: int, log=print) -> Path:
    """Task ``name``'s base model under ``cache_dir`` (built once, then reused)."""
    from .assets import build_base_model

    return build_base_model(cache_dir, task=name, seed=seed, log=log)


def _register() -> None:
    """Put the tasks in ``stapo.tasks``, where the trainer looks names up."""
    import functools

    from ..tasks import BuiltinTask, register_task

    for t in TASKS.values():
        register_task(BuiltinTask(t.name, t.make_problems, functools.partial(build_model, t.name)))


_register()
