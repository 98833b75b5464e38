"""Reward functions by name: the built-ins and users' functions given as ``module:function``.

Every reward is called through one signature inside the workers::

    score(response: str, gold: str | list[str], *, strict=False, prompt=None,
          data_source=None, extra_info=None) -> float

Users' functions keep their own framework's signature and go through an adapter:

- verl: ``fn(data_source, solution_str, ground_truth, extra_info=None) -> float | dict`` (a dict
  carries the reward under ``"score"``, as verl's ``default_compute_score`` returns);
- TRL: ``fn(prompts, completions, **columns) -> list[float | None]``, called with a batch of one;
  the gold goes in the dataset columns ``solution``, ``answer`` and ``ground_truth`` (those the
  function accepts), as TRL passes dataset columns; ``None`` ("not applicable") scores 0.0;
- native: a function whose first two parameters are ``response, gold``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

from ..errors import UserError

BUILTIN = {
    "math": "stapo.rewards.math_reward:math_reward",
    "dapo": "stapo.rewards.dapo:dapo_reward",
}
SIGNATURES = ("auto", "native", "verl", "trl")
_GOLD_COLUMNS = ("solution", "answer", "ground_truth")


class RewardError(UserError, ValueError):
    """A reward that cannot be used: its module is missing, raises or hangs on import, or its function
    is missing or has an unknown signature. One line, naming the ``module:function``."""


class InvalidReward(ValueError):
    """A reward function returned NaN, an infinity or something that is not a number."""


def as_score(value: Any) -> float:
    """``value`` as a finite float, else ``InvalidReward`` (the pool scores the item 0.0 and counts it
    in ``reward/invalid``: a NaN would otherwise poison the advantages and skip the optimizer step)."""
    if value is None or isinstance(value, (str, bytes)):
        raise InvalidReward(f"returned {value!r:.60}, not a number")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise InvalidReward(f"returned {type(value).__name__} {value!r:.60}, not a number") from None
    if not math.isfinite(score):
        raise InvalidReward(f"returned {score}")
    return score


def check_spec(spec: str) -> tuple[str, str]:
    """``"package.module:function"`` -> (module, attribute), checked for shape only (nothing imported)."""
    module_name, sep, attr = BUILTIN.get(spec, spec).partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected 'math', 'dapo' or 'module:function'")
    return module_name, attr


def import_function(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (a ``RewardError`` naming what is missing)."""
    module_name, attr = check_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r}: {err}") from err
    except (Exception, SystemExit) as err:  # the user's module raised at import
        raise RewardError(
            f"reward {spec!r}: importing module {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {attr!r} is not callable")
    return obj


def function_spec(fn: Callable) -> str:
    """The ``module:function`` path of a module-level function (worker processes re-import it)."""
    spec = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in spec or fn.__module__ == "__main__":
        raise RewardError(
            f"reward function {spec!r} cannot be imported by a worker process: define it at module "
            "level in an importable module and pass it as 'module:function'"
        )
    return spec


def detect_signature(fn: Callable) -> str:
    """'verl', 'trl' or 'native', from the function's parameter names."""
    params = list(inspect.signature(fn).parameters)
    if "solution_str" in params or params[:1] == ["data_source"]:
        return "verl"
    if "completions" in params:
        return "trl"
    if params[:2] == ["response", "gold"]:
        return "native"
    raise RewardError(
        f"reward function {getattr(fn, '__qualname__', fn)!r} has parameters {params}: expected "
        "verl's (data_source, solution_str, ground_truth, extra_info=None), TRL's "
        "(prompts, completions, **columns) or (response, gold, **kwargs)"
    )


@dataclasses.dataclass(frozen=True)
class VerlAdapter:
    fn: Callable

    def __call__(self, response, gold, *, data_source=None, extra_info=None, **_) -> float:
        out = self.fn(data_source, response, gold, extra_info)
        return as_score(out["score"] if isinstance(out, dict) else out)


@dataclasses.dataclass(frozen=True)
class TrlAdapter:
    fn: Callable

    def __call__(self, response, gold, *, prompt=None, **_) -> float:
        params = inspect.signature(self.fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        columns = {c: [gold] for c in _GOLD_COLUMNS if takes_any or c in params}
        out = self.fn(prompts=[prompt if prompt is not None else ""], completions=[response], **columns)
        value = out[0]
        return 0.0 if value is None else as_score(value)


@dataclasses.dataclass(frozen=True)
class NativeAdapter:
    fn: Callable

    def __call__(self, response, gold, **kwargs) -> float:
        params = inspect.signature(self.fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return as_score(self.fn(response, gold, **kwargs))


_ADAPTERS = {"verl": VerlAdapter, "trl": TrlAdapter, "native": NativeAdapter}


def resolve_reward(spec: str | Callable, signature: str = "auto") -> Callable[..., float]:
    """A reward name, ``module:function`` path or function -> a scorer with the one signature above."""
    if signature not in SIGNATURES:
        raise ValueError(f"signature={signature!r}: expected one of {SIGNATURES}")
    if isinstance(spec, str):
        fn = import_function(BUILTIN.get(spec, spec))
    elif callable(spec):
        fn = spec
    else:
        raise TypeError(f"reward must be a name, 'module:function' or a function, got {type(spec).__name__}")
    kind = detect_signature(fn) if signature == "auto" else signature
    return _ADAPTERS[kind](fn)


def reward_spec(reward: str | Callable) -> str:
    """What a worker process needs to rebuild ``reward``: a built-in name or ``module:function``."""
    if isinstance(reward, str):
        return reward
    return function_spec(reward)
