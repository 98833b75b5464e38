"""Config fields with what they allow declared beside the default, and the one check of them.

    lr: float = option(1e-6, gt=0)                       # a range
    loss_agg_mode: str = option("token-mean", choices=AGG_MODES)
    entropy_threshold: float | None = statistic()        # set by the trainer per mini-batch

``check_fields(obj)`` checks every field of a config dataclass against its annotation (the type,
as the YAML loader reads it: an int is a float, ``on`` is ``"on"``) and its declared range. A float
must be finite unless it is a statistic. The training config (``stapo.config.train``) and the
objectives' configs (``__post_init__``) share it, so a value is refused in the same words wherever
it comes from. A subclass that changes only a default (``clip_high: float = 0.28``) keeps the range
its parent declared.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .schema import ValueRefused, _coerce, type_hints


@dataclasses.dataclass(frozen=True)
class Bounds:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None

    def admits(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # lists, strings, sections: their type is all there is to check
        return (math.isfinite(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """What the bounds allow, e.g. ``> 0 and <= 1``, ``one of 'a', 'b'``, ``finite``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        parts = [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts) or "finite"


FINITE = Bounds()


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, ge=None, gt=None,
           le=None, lt=None, choices: tuple | None = None) -> Any:
    """A dataclass field with its allowed values (``ge``/``gt``/``le``/``lt`` bounds or ``choices``)."""
    bounds = Bounds(ge, gt, le, lt, None if choices is None else tuple(choices))
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"bounds": bounds})


def statistic() -> Any:
    """A field the trainer sets from each mini-batch (e.g. S2T's τ_h): not an option a user sets."""
    return dataclasses.field(default=None, metadata={"statistic": True})


def _declared(cls, name: str, what: str):
    for base in cls.__mro__:  # a subclass that only changes the default keeps its parent's declaration
        f = getattr(base, "__dataclass_fields__", {}).get(name)
        if f is not None and what in f.metadata:
            return f.metadata[what]
    return None


def field_bounds(cls, name: str, value: Any = None) -> Bounds | None:
    """The declared bounds of field ``name`` of ``cls``; a float without any must be finite."""
    declared = _declared(cls, name, "bounds")
    return declared if declared is not None else (FINITE if isinstance(value, float) else None)


def is_statistic(cls, name: str) -> bool:
    return bool(_declared(cls, name, "statistic"))


def options_of(cls) -> list[str]:
    """The fields of config dataclass ``cls`` a user may set (its statistics left out)."""
    return [f.name for f in dataclasses.fields(cls) if not is_statistic(cls, f.name)]


def check_fields(obj, prefix: str = "") -> None:
    """Check (and normalise: ``1`` -> ``1.0``, ``True`` -> ``"on"``) every field of dataclass ``obj``,
    sections included; raises ``ValueRefused`` naming ``prefix + field``."""
    cls = type(obj)
    hints = type_hints(cls)
    for f in dataclasses.fields(obj):
        if is_statistic(cls, f.name):
            continue
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
            continue
        typed = _coerce(hints[f.name], value, key)
        if type(typed) is not type(value) or typed != value:
            object.__setattr__(obj, f.name, typed)  # works on frozen dataclasses too
        bounds = field_bounds(cls, f.name, typed)
        if typed is not None and bounds is not None and not bounds.admits(typed):
            raise ValueRefused(key, f"must be {bounds.describe()}; got {typed!r}")
