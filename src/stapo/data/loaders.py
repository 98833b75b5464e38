"""Loaders: JSON / JSONL with configurable fields, verl parquet (DAPO-Math-17k schema), presets.

Every loader returns ``list[Problem]``; every malformed input is a ``DataError`` that names the file,
the row and the field. The data directory (the folder holding ``benchmarks/`` and ``train/``) comes
from the caller or the ``STAPO_DATA_DIR`` environment variable, never from a built-in path.

verl parquet schema (one row per problem), read and written here::

    data_source: str                          e.g. "math_dapo", "math500"
    prompt:      list[{role: str, content: str}]   the chat messages (template already applied)
    ability:     str                          "math"
    reward_model: {style: str, ground_truth: str}
    extra_info:  {index: int, id: str, answer_parts: list[str], meta: str (JSON)}   (ours; any dict is read)
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .problem import Problem
from .prompts import apply_template, strip_template


class DataError(UserError, ValueError):
    """A data file is missing a field, or has one of the wrong type; the message names both."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$STAPO_DATA_DIR``; it must exist."""
    origin = "data_dir"
    if data_dir is None:
        data_dir, origin = os.environ.get("STAPO_DATA_DIR"), "STAPO_DATA_DIR"
    if not data_dir:
        raise DataError(
            "no data directory: pass data_dir=... (or --data-dir) or set STAPO_DATA_DIR to the folder "
            "that holds benchmarks/ and train/"
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} (from {origin}) does not exist")
    return path


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON array (``.json``) or JSON-lines (``.jsonl``) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    text = path.read_text(encoding="utf-8")
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


def get_field(row: dict, field: str, path: Any, i: int) -> Any:
    """``row[field]`` (dots reach into nested objects: ``reward_model.ground_truth``), or a DataError."""
    value: Any = row
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value or value[key] is None:
            raise DataError(f"{path}: row {i} has no field {field!r} (fields: {sorted(row)})")
        value = value[key]
    return value


def answer_text(value: Any, path: Any = "?", i: int = 0, field: str = "answer") -> str | list[str]:
    """A gold answer as text: numbers canonical (``27.0`` -> ``"27"``), lists as parts."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{path}: row {i} field {field!r} is {value!r}, expected text or a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{path}: row {i} field {field!r} is empty")
        return value.strip()
    if isinstance(value, (list, tuple)) and value:
        parts = [answer_text(v, path, i, field) for v in value]
        if any(isinstance(p, list) for p in parts):
            raise DataError(f"{path}: row {i} field {field!r} is a nested list")
        return parts[0] if len(parts) == 1 else parts  # type: ignore[return-value]
    raise DataError(f"{path}: row {i} field {field!r} is {type(value).__name__} {value!r}")


def load_json(
    path: str | os.PathLike,
    problem_field: str = "problem",
    answer_field: str = "answer",
    *,
    id_field: str | None = None,
    source: str | None = None,
    meta_fields: Iterable[str] | None = None,
    limit: int | None = None,
    on_missing: str = "error",
) -> list[Problem]:
    """Problems from a JSON array or JSONL file. ``meta`` keeps ``meta_fields`` (default: every
    other field). Ids are ``"{source}/{id_field or row index}"``; source defaults to the file stem.

    ``on_missing``: a row without a usable answer raises a ``DataError`` ("error") or is left out with
    one warning that lists the rows ("skip"; ids keep the original row index).
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing={on_missing!r}: expected 'error' or 'skip'")
    path = Path(path)
    rows = read_records(path)[:limit]
    source = source or path.stem
    keep = None if meta_fields is None else set(meta_fields)
    problems, skipped = [], []
    for i, row in enumerate(rows):
        prompt = get_field(row, problem_field, path, i)
        if not isinstance(prompt, str):
            raise DataError(
                f"{path}: row {i} field {problem_field!r} is {type(prompt).__name__}, expected text"
            )
        try:
            answer = answer_text(get_field(row, answer_field, path, i), path, i, answer_field)
        except DataError:
            if on_missing == "error":
                raise
            skipped.append(i)
            continue
        key = get_field(row, id_field, path, i) if id_field else i
        meta = {
            k: v
            for k, v in row.items()
            if k not in (problem_field, answer_field) and (keep is None or k in keep)
        }
        problems.append(Problem(id=f"{source}/{key}", prompt=prompt, answer=answer, source=source, meta=meta))
    if skipped:
        warnings.warn(
            f"{path}: left out {len(skipped)} rows without a usable {answer_field!r}: rows {skipped}",
            stacklevel=2,
        )
    return problems


def _user_content(messages: Any, path: Path, i: int) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    raise DataError(
        f"{path}: row {i} field 'prompt' has no user message (expected [{{'role': 'user', 'content': ...}}])"
    )


def load_verl_parquet(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """Problems from a verl-schema parquet (DAPO-Math-17k and ``write_verl_parquet``'s output).

    The user message's instruction template (``boxed`` or ``dapo``) is stripped, so ``prompt`` is the
    bare question; the original messages are kept in ``meta["messages"]`` when they differ from it.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parquet file {path} not found")
    table = pq.read_table(path)
    for column in ("prompt", "reward_model"):
        if column not in table.column_names:
            raise DataError(f"{path}: no column {column!r} (verl schema: {', '.join(VERL_COLUMNS)})")
    if limit is not None:
        table = table.slice(0, limit)
    problems = []
    for i, row in enumerate(table.to_pylist()):
        content = _user_content(get_field(row, "prompt", path, i), path, i)
        extra = row.get("extra_info") or {}
        parts = extra.get("answer_parts") or []
        if len(parts) > 1:
            answer: str | list[str] = [str(p) for p in parts]
        else:
            answer = answer_text(
                get_field(row, "reward_model.ground_truth", path, i), path, i, "reward_model.ground_truth"
            )
        meta = json.loads(extra["meta"]) if isinstance(extra.get("meta"), str) else {}
        meta |= {k: v for k, v in extra.items() if k not in ("meta", "answer_parts", "id", "index")}
        for key, value in (
            ("ability", row.get("ability")),
            ("reward_style", (row["reward_model"] or {}).get("style")),
        ):
            if value is not None:
                meta.setdefault(key, value)
        question = strip_template(content)
        if question != content or (isinstance(row["prompt"], list) and len(row["prompt"]) > 1):
            meta["messages"] = row["prompt"]
        source = row.get("data_source") or path.stem
        key = extra.get("id") or f"{source}/{extra.get('index', i)}"
        problems.append(Problem(id=str(key), prompt=question, answer=answer, source=source, meta=meta))
    return problems


VERL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def _verl_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("index", pa.int64()),
                        ("id", pa.string()),
                        ("answer_parts", pa.list_(pa.string())),
                        ("meta", pa.string()),
                    ]
                ),
            ),
        ]
    )


def write_verl_parquet(problems: Iterable[Problem], path: str | os.PathLike, template: str = "boxed") -> Path:
    """Write problems as verl-schema parquet; the user message is the question in ``template``.

    ``ground_truth`` is a string (multi-part answers joined with ", ", the parts kept in
    ``extra_info.answer_parts``) so verl's and TRL's reward functions read it unchanged.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, p in enumerate(problems):
        parts = p.answer_parts
        rows.append(
            {
                "data_source": p.source,
                "prompt": [{"role": "user", "content": apply_template(p.prompt, template)}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": ", ".join(parts)},
                "extra_info": {
                    "index": i,
                    "id": p.id,
                    "answer_parts": parts if len(parts) > 1 else [],
                    "meta": json.dumps(p.meta, default=str, ensure_ascii=False),
                },
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_verl_schema()), path)
    return path


@dataclasses.dataclass(frozen=True)
class Preset:
    """A training set under the data directory and the JSON fields that hold its question and answer."""

    path: str  # relative to the data directory
    problem_field: str = "problem"
    answer_field: str = "answer"
    on_missing: str = "error"


PRESETS = {
    # MATH training split: 7,474 rows, 4 of them (886, 1009, 5328, 5330) without an answer
    "math_train": Preset("train/math_train.json", on_missing="skip"),
    "aime_1983_2023": Preset("train/aime_1983_2023.json"),  # AIME 1983-2023, 975 rows
}


def load_problems(
    path_or_preset: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    **json_fields,
) -> list[Problem]:
    """Any supported input: a preset (``math_train``, ``aime_1983_2023``), a benchmark name, or a
    ``.parquet`` (verl), ``.json`` / ``.jsonl`` file (``json_fields`` go to ``load_json``)."""
    from .benchmarks import BENCHMARKS, load_benchmark

    name = str(path_or_preset)
    if name in PRESETS:
        preset = PRESETS[name]
        path = resolve_data_dir(data_dir) / preset.path
        return load_json(
            path,
            preset.problem_field,
            preset.answer_field,
            source=name,
            limit=limit,
            on_missing=preset.on_missing,
        )
    if name in BENCHMARKS:
        return load_benchmark(name, data_dir)[:limit]
    path = Path(path_or_preset)
    if path.suffix == ".parquet":
        return load_verl_parquet(path, limit=limit)
    if path.suffix in (".json", ".jsonl"):
        return load_json(path, limit=limit, **json_fields)
    if not path.exists():
        raise FileNotFoundError(
            f"{name!r}: no such file, and not a preset ({', '.join(PRESETS)}) or benchmark ({', '.join(BENCHMARKS)})"
        )
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected .parquet, .json or .jsonl)")
