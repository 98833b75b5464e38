"""Reading rows: JSON / JSONL files, fields (dotted for nested ones), gold answers as text, the data directory.

Every loader builds on these; every malformed input is a ``DataError`` naming the file, row and field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError


class DataError(UserError, ValueError):
    """A data file is missing a field, or has one of the wrong type; the message names both."""


class MissingValue(DataError):
    """A row's question or answer is there but null or empty: the loaders leave the row out."""


def user_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir`` if given, else ``$STAPO_DATA_DIR``, else None; a named folder must exist."""
    origin = "data_dir"
    if data_dir is None:
        data_dir, origin = os.environ.get("STAPO_DATA_DIR"), "STAPO_DATA_DIR"
    if not data_dir:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} (from {origin}) does not exist")
    return path


def resolve_data_dir(data_dir: str | os.PathLike | None = None, what: str = "this data") -> Path:
    """``user_data_dir``, required: ``what`` (e.g. "preset 'math_train'") names what needs it."""
    path = user_data_dir(data_dir)
    if path is None:
        raise DataError(
            f"no data directory for {what}: pass data_dir=... (data.data_dir=..., --data-dir) or set "
            "STAPO_DATA_DIR to the folder that holds train/ (and optionally benchmarks/)"
        )
    return path


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON array (``.json``) or JSON-lines (``.jsonl``) file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {n} is not valid JSON: {err}") from err
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON ({err}); JSON-lines files need the .jsonl extension"
            ) from err
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is {type(row).__name__}, expected an object")
    return rows


def read_text(path: Path) -> str:
    """A file's text as UTF-8; other bytes are a DataError naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                        f"{err.start}); convert the file to UTF-8") from None


def get_field(row: dict, field: str, path: Any, i: int) -> Any:
    """``row[field]`` (dots reach into nested objects: ``reward_model.ground_truth``): a DataError
    if it is absent, a ``MissingValue`` if it is null."""
    value: Any = row
    for depth, key in enumerate(field.split(".")):
        if not isinstance(value, dict) or key not in value:
            where = "row" if depth == 0 else f"field {'.'.join(field.split('.')[:depth])!r}"
            has = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{path}: row {i} has no field {field!r} (the {where} has {has})")
        if value[key] is None:
            raise MissingValue(f"{path}: row {i} field {field!r} is null")
        value = value[key]
    return value


def question_text(value: Any, path: Any = "?", i: int = 0, field: str = "problem") -> str:
    """A question as text; blank is a ``MissingValue``, anything but text a DataError."""
    if not isinstance(value, str):
        raise DataError(f"{path}: row {i} field {field!r} is {type(value).__name__}, expected text")
    if not value.strip():
        raise MissingValue(f"{path}: row {i} field {field!r} is empty")
    return value


def answer_text(value: Any, path: Any = "?", i: int = 0, field: str = "answer") -> str | list[str]:
    """A gold answer as text: numbers canonical (``27.0`` -> ``"27"``), lists as parts."""
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        raise MissingValue(f"{path}: row {i} field {field!r} is {'null' if value is None else 'empty'}")
    if isinstance(value, bool):
        raise DataError(f"{path}: row {i} field {field!r} is {value!r}, expected text or a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise MissingValue(f"{path}: row {i} field {field!r} is empty")
        return value.strip()
    if isinstance(value, (list, tuple)) and value:
        parts = [answer_text(v, path, i, field) for v in value]
        if any(isinstance(p, list) for p in parts):
            raise DataError(f"{path}: row {i} field {field!r} is a nested list")
        return parts[0] if len(parts) == 1 else parts  # type: ignore[return-value]
    raise DataError(f"{path}: row {i} field {field!r} is {type(value).__name__} {value!r}")
