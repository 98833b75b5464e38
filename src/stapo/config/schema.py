"""Typed config: nested dataclasses loaded from YAML, with dotted ``a.b=v`` overrides.

As nanoGPT's configurator: unknown keys and wrong types are errors that name the
key and what is allowed. Values on the command line are parsed as YAML scalars
(``lr=1e-6``, ``rollout.n=4``, ``model.lora.target_modules=[q_proj,v_proj]``).

An enum key (a ``Literal``) reads a value as the user means it: YAML turns ``on``/``off``,
``yes``/``no`` and ``true``/``false`` into booleans, so a boolean (or any of those words, in any
case) is the one allowed value of that truth (``model.bf16_autocast=on`` is ``"on"``,
``reuse.gate=off`` is ``"none"``). A bool key reads the same words quoted (``"yes"``). An
``Annotated[Literal[...], Aliases({...})]`` key also takes the aliases (``bf16`` for ``bfloat16``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key."""


class ValueRefused(ConfigError):
    """``key`` holds a value outside what it allows; ``problem`` says what it must be (and what it got)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"config key {key!r} {problem}")

    def under(self, prefix: str) -> ValueRefused:
        """The same error for a dataclass that sits under ``prefix`` in the config."""
        return ValueRefused(prefix + self.key, self.problem)


class Aliases(dict):
    """``Annotated`` metadata of a ``Literal`` key: other spellings -> the allowed value they mean."""


BOOLEAN_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}
WORD_TRUTH = {w: truth for truth, words in BOOLEAN_WORDS.items() for w in words}
# the enum values a truth may mean: an enum whose "off" is spelt "none" (reuse.gate, parallel.strategy)
TRUTH_VALUES = {True: BOOLEAN_WORDS[True], False: (*BOOLEAN_WORDS[False], "none")}


def type_hints(cls) -> dict[str, Any]:
    """The fields' annotations of dataclass ``cls``, ``Annotated`` metadata kept."""
    return _hints(cls)


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict, checking every key and type.

    A value refused by ``cls`` itself (its ``__post_init__``) is reported under ``prefix`` too.
    """
    data = dict(data or {})
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))  # a YAML key may be a number (1: x)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown config key {key!r}; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    try:
        return cls(**kwargs)
    except ValueRefused as err:
        raise err.under(prefix) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=v`` strings to a nested dict (in place) and return it."""
    from .yamlfile import parse_yaml  # (it raises this module's ConfigError)

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. rollout.n=4)")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override {key.strip()!r}") if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror}") from None
    from .yamlfile import parse_yaml

    data = parse_yaml(text, str(path))
    if data is None:  # an empty file would silently mean the schema defaults (P = 256, 1,024 new tokens)
        raise ConfigError(f"{path} is empty: give config keys, or omit the file to run the built-in demo")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge (update wins)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp, value: Any, key: str):
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        aliases = next((e for e in extras if isinstance(e, Aliases)), {})
        if isinstance(value, str) and value.lower() in aliases:
            value = aliases[value.lower()]
        try:
            return _coerce(base, value, key)
        except ValueRefused as err:
            if not aliases:
                raise
            also = ", ".join(f"{a} for {v}" for a, v in aliases.items())
            raise ValueRefused(err.key, f"{err.problem} (also accepted: {also})") from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueRefused(key, f"is a section; give a mapping, got {value!r}")
        return from_dict(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ValueRefused(key, f"must be one of the types {tp}; got {value!r}")
    if origin is Literal:
        return _literal(get_args(tp), value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueRefused(key, f"must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueRefused(key, f"must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and isinstance(value, str) and value.lower() in WORD_TRUTH:  # a quoted "on" / "no"
        return WORD_TRUTH[value.lower()]
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueRefused(key, f"must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _literal(allowed: tuple, value: Any, key: str):
    """The allowed value ``value`` spells: itself, the same word in another case, or an on/yes/true
    (off/no/false) word or boolean for the allowed value of that truth (``TRUTH_VALUES``)."""
    if not isinstance(value, bool) and value in allowed:
        return value
    words: set[str] = {value.lower()} if isinstance(value, str) else set()
    truth = value if isinstance(value, bool) else WORD_TRUTH.get(value.lower()) if isinstance(value, str) else None
    if truth is not None:
        words |= set(TRUTH_VALUES[truth])
    found = [a for a in allowed if isinstance(a, str) and a.lower() in words]
    if len(found) == 1:
        return found[0]
    got = f"{value!r} (YAML reads on/yes/true and off/no/false as booleans)" if isinstance(value, bool) else repr(value)
    raise ValueRefused(key, f"must be one of {', '.join(map(repr, allowed))}; got {got}")
