"""Every config key with its type, default and allowed values, generated from the dataclasses.

``stapo config --keys`` prints it, ``stapo train --help`` ends with it. Nothing here is a hand-kept
list: types come from the annotations, ranges from ``stapo.config.fields``, enum values from the
``Literal``s, the objectives and advantage estimators from their registries, and each key's note
from the comment beside its field in the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from .fields import field_bounds, options_of
from .schema import Aliases, type_hints

KEYS_HERE = "<<config keys>>"  # where a help text takes the listing (built only when help is shown)


class KeysHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A raw help formatter that writes the key listing in place of ``KEYS_HERE``: generating it
    imports the objectives (torch), which a command that only parses its arguments should not pay."""

    def add_text(self, text):
        if text and KEYS_HERE in text:
            text = text.replace(KEYS_HERE, keys_text(with_objective_options=False))
        super().add_text(text)


@dataclasses.dataclass(frozen=True)
class Key:
    key: str
    type: str
    default: str
    allowed: str
    note: str


def config_keys(cls=None, prefix: str = "") -> list[Key]:
    """The keys of ``cls`` (default: ``TrainConfig``), sections flattened to dotted names."""
    if cls is None:
        from .train import TrainConfig

        cls = TrainConfig
    hints, notes, defaults = type_hints(cls), _notes(cls), cls()
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("statistic"):
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
            continue
        key = prefix + f.name
        allowed = _registry_names(key) or _allowed(hints[f.name], field_bounds(cls, f.name, default))
        keys.append(Key(key, _type_name(hints[f.name]), _show(default), allowed, notes.get(f.name, "")))
    return keys


def preset_key() -> Key:
    """``preset``: not a field of the config but a choice of ``objective.name`` (``stapo.config.objective``)."""
    return Key("preset", "str | null", "null", _registry_names("objective.name"),
               "objective.name=NAME with that objective's own defaults (docs/recipes.md)")


def objective_keys() -> dict[str, list[Key]]:
    """``objective.options.*`` of each registered objective: {objective name: its option keys}. An
    option whose default a train config fills in (``FROM_TRAIN_CONFIG``) shows that key as its default."""
    from ..objectives import OBJECTIVES
    from .objective import FROM_TRAIN_CONFIG

    out = {}
    for name, spec in OBJECTIVES.items():
        keep = set(options_of(spec.config_cls))
        keys = [k for k in config_keys(spec.config_cls, "objective.options.") if k.key.rsplit(".", 1)[1] in keep]
        out[name] = [dataclasses.replace(k, default=FROM_TRAIN_CONFIG.get(k.key.rsplit(".", 1)[1], k.default))
                     for k in keys]
    return out


def format_keys(keys: list[Key], indent: str = "  ") -> str:
    """Columns: key, type, default (aligned), then the allowed values and the note."""
    rows = [(k.key, k.type, k.default, k.allowed, f"# {k.note}" if k.note else "") for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(3)] + [0, 0]  # allowed values vary too much to pad
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def keys_text(with_objective_options: bool = True) -> str:
    """The whole listing: every ``TrainConfig`` key, then each objective's options (or their names)."""
    header = ("config keys (KEY=VALUE on the command line, or nested in a YAML file):\n"
              "  enum keys also read on/yes/true and off/no/false as the allowed value of that truth\n"
              "  (off is none where the enum has no off); bool keys read them quoted too\n")
    parts = [header + format_keys([preset_key(), *config_keys()])]
    for name, keys in objective_keys().items():
        if with_objective_options:
            parts.append(f"objective.options of {name} (objective.name={name} or preset={name}):\n" + format_keys(keys))
        else:
            parts.append(f"  objective.options of {name}: " + ", ".join(k.key.rsplit(".", 1)[1] for k in keys))
    if not with_objective_options:
        parts[1] = "objective options (types, defaults and ranges: stapo config --keys):\n" + parts[1]
        return parts[0] + "\n\n" + "\n".join(parts[1:])
    return "\n\n".join(parts)


def _registry_names(key: str) -> str:
    if key == "objective.name":
        from ..objectives import OBJECTIVES

        return ", ".join(OBJECTIVES)
    if key == "objective.advantage":
        from ..advantages import ADVANTAGES

        return ", ".join(ADVANTAGES)
    if key == "rollout.backend":
        from ..rollout.backends import BACKENDS

        return ", ".join(BACKENDS)
    if key == "objective.options":
        return "the options of objective.name (below)"
    return ""


def _allowed(tp, bounds) -> str:
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        aliases = next((e for e in extras if isinstance(e, Aliases)), {})
        also = ", ".join(f"{a}={v}" for a, v in aliases.items())
        return _allowed(base, bounds) + (f" ({also})" if also else "")
    if get_origin(tp) is Literal:
        return ", ".join(map(str, get_args(tp)))
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        text = _allowed(inner[0], bounds) if len(inner) == 1 else ""
        return f"{text} or null" if text else ""
    return "" if bounds is None else bounds.describe().removeprefix("one of ").replace("'", "")


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return "enum"
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list[{_type_name(get_args(tp)[0])}]" if get_args(tp) else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return "{}" if value == {} else str(value)


def _notes(cls) -> dict[str, str]:
    """{field: the comment at the end of its line} across ``cls`` and its dataclass bases."""
    notes: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(base):
            continue
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^    (\w+): [^#\n]*#\s*(.+)$", source, re.MULTILINE):
            notes[m.group(1)] = m.group(2).strip()
    return notes
