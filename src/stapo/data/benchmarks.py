"""The six evaluation sets, each read from its own published schema into ``Problem``.

The files ship with the package (``benchmarks_data/``, MIT, from math-evaluation-harness: see
``benchmarks_data/LICENSE.math-evaluation-harness``). A data directory from the caller or
``$STAPO_DATA_DIR`` overrides them: its ``benchmarks/`` folder is read instead.

| name          | file                | question         | gold answer                                        |
|---------------|---------------------|------------------|----------------------------------------------------|
| aime24        | aime24.jsonl        | problem          | answer (integer string)                            |
| aime25        | aime25.jsonl        | problem          | answer (integer string)                            |
| amc23         | amc23.jsonl         | problem          | answer (float 27.0 -> "27")                        |
| math500       | math500.jsonl       | problem          | answer (LaTeX)                                     |
| minerva       | minerva_math.jsonl  | problem          | last \\boxed{} of solution                         |
| olympiadbench | olympiadbench.jsonl | context+question | final_answer (list; multi-answer items -> parts)   |
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..rewards.extract import answer_parts, last_boxed, strip_dollars
from .problem import Problem
from .records import DataError, answer_text, get_field, read_records, user_data_dir

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
FILES = {
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "math500": "math500.jsonl",
    "minerva": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
}
BUNDLED_DIR = Path(__file__).with_name("benchmarks_data")  # package data (pyproject: package-data)
ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 675}

RowFn = Callable[[dict, int, Path], Problem]


def _simple(name: str, id_field: str | None = None, meta: tuple[str, ...] = ()) -> RowFn:
    """Rows with ``problem`` and ``answer`` fields (AIME, AMC, MATH-500)."""

    def row_fn(row: dict, i: int, path: Path) -> Problem:
        raw = get_field(row, "answer", path, i)
        key = row.get(id_field, i) if id_field else i
        return Problem(
            id=f"{name}/{key}",
            prompt=get_field(row, "problem", path, i),
            answer=answer_text(raw, path, i),
            source=name,
            meta={"raw_answer": raw, **{k: row[k] for k in meta if k in row}},
        )

    return row_fn


def _minerva(row: dict, i: int, path: Path) -> Problem:
    solution = get_field(row, "solution", path, i)
    gold = last_boxed(solution)
    if not gold:
        raise DataError(f"{path}: row {i} field 'solution' has no \\boxed{{...}} answer")
    return Problem(
        id=f"minerva/{row.get('idx', i)}",
        prompt=get_field(row, "problem", path, i),
        answer=gold.strip(),
        source="minerva",
        meta={"solution": solution, "type": row.get("type")},
    )


def _olympiad(row: dict, i: int, path: Path) -> Problem:
    final = get_field(row, "final_answer", path, i)
    if not isinstance(final, list) or not final:
        raise DataError(f"{path}: row {i} field 'final_answer' is {final!r}, expected a non-empty list")
    parts = [strip_dollars(str(a)) for a in final]
    if len(parts) == 1 and row.get("is_multiple_answer"):
        # "$69$,$84$" -> ["69", "84"]: a multi-answer item needs every part right
        parts = answer_parts(str(final[0]), k=2)
    question = get_field(row, "question", path, i)
    context = row.get("context")
    if context and context != "None":
        question = f"{context}\n\n{question}"
    return Problem(
        id=f"olympiadbench/{row.get('id', i)}",
        prompt=question,
        answer=parts[0] if len(parts) == 1 else parts,
        source="olympiadbench",
        meta={
            k: row.get(k) for k in ("final_answer", "is_multiple_answer", "unit", "answer_type", "subfield")
        },
    )


_ROW_FNS: dict[str, RowFn] = {
    "aime24": _simple("aime24", "id", ("url", "solution")),
    "aime25": _simple("aime25"),
    "amc23": _simple("amc23", "id", ("url",)),
    "math500": _simple("math500", "unique_id", ("solution", "subject", "level")),
    "minerva": _minerva,
    "olympiadbench": _olympiad,
}


def benchmark_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file of benchmark ``name``: under ``{data_dir or $STAPO_DATA_DIR}/benchmarks/``, else bundled."""
    if name not in _ROW_FNS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    user_dir = user_data_dir(data_dir)
    path = (user_dir / "benchmarks" if user_dir else BUNDLED_DIR) / FILES[name]
    if not path.is_file():
        hint = " (unset STAPO_DATA_DIR / --data-dir to use the bundled copy)" if user_dir else ""
        raise FileNotFoundError(f"benchmark {name!r}: file {path} not found{hint}")
    return path


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """All rows of benchmark ``name`` (one of ``BENCHMARKS``) as ``Problem``s, in file order."""
    path = benchmark_path(name, data_dir)
    return [_ROW_FNS[name](row, i, path) for i, row in enumerate(read_records(path))]
