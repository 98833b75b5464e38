"""Loaders: JSON / JSONL with configurable fields, verl parquet (DAPO-Math-17k schema), presets, and
datasets by hub id or local dataset folder (``hf:ORG/NAME[:split]``, through ``datasets``).

Every loader returns ``list[Problem]``; every malformed input is a ``DataError`` that names the file,
the row and the field. The training presets live in a data directory (the folder holding ``train/``)
from the caller or the ``STAPO_DATA_DIR`` environment variable; the benchmarks ship with the package.

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import InputWarning
from .benchmarks import BENCHMARKS, load_benchmark
from .problem import Problem
from .prompts import apply_template, strip_template
from .records import (
    DataError,
    MissingValue,
    answer_text,
    get_field,
    question_text,
    read_records,
    resolve_data_dir,
)


def load_json(
    path: str | os.PathLike,
    problem_field: str = "problem",
    answer_field: str = "answer",
    *,
    id_field: str | None = None,
    source: str | None = None,
    meta_fields: Iterable[str] | None = None,
    limit: int | None = None,
    on_missing: str = "skip",
) -> list[Problem]:
    """Problems from a JSON array or JSONL file (fields as in ``rows_to_problems``); source defaults
    to the file stem."""
    path = Path(path)
    rows = read_records(path)[:limit]
    return rows_to_problems(
        rows, path, problem_field, answer_field, id_field=id_field, source=source or path.stem,
        meta_fields=meta_fields, on_missing=on_missing,
    )  # fmt: skip


def rows_to_problems(
    rows: list[dict],
    origin: Any,
    problem_field: str = "problem",
    answer_field: str = "answer",
    *,
    id_field: str | None = None,
    source: str = "data",
    meta_fields: Iterable[str] | None = None,
    on_missing: str = "skip",
) -> list[Problem]:
    """Problems from rows with a question and an answer field (dots reach nested fields). ``meta`` keeps
    ``meta_fields`` (default: every other field). Ids are ``"{source}/{id_field or row index}"``;
    ``origin`` (a path or dataset name) is what error messages name.

    A field that is absent, or of the wrong type, is a ``DataError``. ``on_missing``: a row whose
    question or answer is null or empty is left out and counted in one warning ("skip"; ids keep the
    original row index), or raises a ``MissingValue`` ("error").
    """
    keep = None if meta_fields is None else set(meta_fields)

    def build(row: dict, i: int) -> Problem:
        prompt = question_text(get_field(row, problem_field, origin, i), origin, i, problem_field)
        answer = answer_text(get_field(row, answer_field, origin, i), origin, i, answer_field)
        key = get_field(row, id_field, origin, i) if id_field else i
        meta = {
            k: v
            for k, v in row.items()
            if k not in (problem_field, answer_field) and (keep is None or k in keep)
        }
        return Problem(id=f"{source}/{key}", prompt=prompt, answer=answer, source=source, meta=meta)

    return _build_rows(rows, origin, build, on_missing, f"{problem_field!r} or {answer_field!r}")


def _build_rows(rows: list[dict], origin: Any, build: Callable[[dict, int], Problem], on_missing: str,
                fields: str) -> list[Problem]:
    """``build(row, i)`` for every row; the rows it finds a ``MissingValue`` in are left out with one
    warning line that counts them ("skip"), or raise ("error")."""
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing={on_missing!r}: expected 'error' or 'skip'")
    problems, skipped = [], []
    for i, row in enumerate(rows):
        try:
            problems.append(build(row, i))
        except MissingValue:
            if on_missing == "error":
                raise
            skipped.append(i)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"{origin}: left out {len(skipped)} rows with a null or empty {fields}: rows [{shown}]; "
                      f"{len(problems)} of {len(rows)} kept", InputWarning, stacklevel=2)
    return problems


def _user_content(messages: Any, path: Any, i: int) -> str:
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
    """Problems from a verl-schema parquet (DAPO-Math-17k and ``write_verl_parquet``'s output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        raise DataError(f"parquet file {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"parquet file {path} not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes), not a parquet file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:  # truncated, or another format under a .parquet name
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    for column in ("prompt", "reward_model"):
        if column not in table.column_names:
            raise DataError(f"{path}: no column {column!r} (verl schema: {', '.join(VERL_COLUMNS)})")
    if limit is not None:
        table = table.slice(0, limit)
    return verl_rows_to_problems(table.to_pylist(), path, path.stem)


def verl_rows_to_problems(rows: list[dict], origin: Any, default_source: str) -> list[Problem]:
    """Problems from verl-schema rows. The user message's instruction template (``boxed`` or ``dapo``)
    is stripped, so ``prompt`` is the bare question; the original messages are kept in
    ``meta["messages"]`` when they differ from it. A null or empty prompt or ground truth leaves its
    row out, counted in one warning (as ``rows_to_problems``)."""
    return _build_rows(rows, origin, lambda row, i: _verl_problem(row, i, origin, default_source), "skip",
                       "'prompt' or 'reward_model.ground_truth'")


def _verl_problem(row: dict, i: int, origin: Any, default_source: str) -> Problem:
    content = question_text(_user_content(get_field(row, "prompt", origin, i), origin, i), origin, i, "prompt")
    extra = row.get("extra_info") or {}
    parts = extra.get("answer_parts") or []
    if len(parts) > 1:
        answer: str | list[str] = [str(p) for p in parts]
    else:
        answer = answer_text(
            get_field(row, "reward_model.ground_truth", origin, i), origin, i, "reward_model.ground_truth"
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
    source = row.get("data_source") or default_source
    key = extra.get("id") or f"{source}/{extra.get('index', i)}"
    return Problem(id=str(key), prompt=question, answer=answer, source=source, meta=meta)


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


PRESETS = {
    # MATH training split: 7,474 rows, 4 of them (886, 1009, 5328, 5330) without an answer
    "math_train": Preset("train/math_train.json"),
    "aime_1983_2023": Preset("train/aime_1983_2023.json"),  # AIME 1983-2023, 975 rows
}


HF_PREFIX = "hf:"


def load_problems(
    path_or_preset: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    **json_fields,
) -> list[Problem]:
    """Any supported input: a preset (``math_train``, ``aime_1983_2023``), a benchmark name, a
    ``.parquet`` (verl), ``.json`` / ``.jsonl`` file, a dataset folder or ``hf:ORG/NAME[:split]``
    (``json_fields`` go to ``rows_to_problems``)."""
    name = str(path_or_preset)
    if name in PRESETS:
        preset = PRESETS[name]
        path = resolve_data_dir(data_dir, what=f"preset {name!r} ({preset.path} under it)") / preset.path
        return load_json(
            path,
            preset.problem_field,
            preset.answer_field,
            source=name,
            limit=limit,
        )
    if name in BENCHMARKS:
        return load_benchmark(name, data_dir)[:limit]
    if name.startswith(HF_PREFIX):
        return load_dataset_problems(name[len(HF_PREFIX) :], limit=limit, **json_fields)
    path = Path(path_or_preset)
    if path.suffix == ".parquet":
        return load_verl_parquet(path, limit=limit)
    if path.suffix in (".json", ".jsonl"):
        return load_json(path, limit=limit, **json_fields)
    if path.is_dir():
        return load_dataset_problems(str(path), limit=limit, **json_fields)
    if not path.exists():
        raise FileNotFoundError(
            f"{name!r}: no such file or folder, and not hf:ORG/NAME, a preset ({', '.join(PRESETS)}) "
            f"or a benchmark ({', '.join(BENCHMARKS)})"
        )
    raise DataError(
        f"{path}: unsupported file type {path.suffix!r} (expected .parquet, .json, .jsonl or a dataset folder)"
    )


def load_dataset_problems(spec: str, limit: int | None = None, **fields) -> list[Problem]:
    """Problems from ``NAME[:split]`` (default split ``train``): NAME is a local folder (written by
    ``save_to_disk``, or holding parquet / json / csv files) or a Hugging Face Hub dataset id, read
    with ``datasets``. Rows in the verl schema (``prompt`` messages, ``reward_model.ground_truth``, as
    DAPO-Math-17k) map as verl parquet does; other rows by ``fields`` (``problem_field``, ...)."""
    name, _, split = spec.partition(":")
    dataset = _open_dataset(name, split or "train")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    origin = f"dataset {name!r}"
    source = Path(name.rstrip("/")).name
    columns = set(dataset.column_names)
    if {"prompt", "reward_model"} <= columns and fields.get("problem_field", "problem") not in columns:
        return verl_rows_to_problems(dataset.to_list(), origin, source)
    fields = {"source": source, **{k: v for k, v in fields.items() if v is not None}}
    return rows_to_problems(dataset.to_list(), origin, **fields)


def _open_dataset(name: str, split: str):
    import datasets

    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            dataset = datasets.load_from_disk(str(folder))  # a save_to_disk folder
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"dataset {name!r}: no split {split!r}; it has {', '.join(dataset)}")
                dataset = dataset[split]
            return dataset
        try:  # a folder of data files
            return datasets.load_dataset(str(folder), split=split)
        except ValueError as err:  # e.g. an unknown split
            raise DataError(f"dataset {name!r}: {err}") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"dataset folder {name!r} not found")
    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as err:  # offline (ConnectionError), unknown id or split, gated
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"hf:{name}:{split}: could not load it from the Hugging Face Hub ({type(err).__name__}: {reason}). "
            "Without network, load it once where there is one and save_to_disk, then pass that folder"
        ) from None
