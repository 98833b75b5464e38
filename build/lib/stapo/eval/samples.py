"""``samples.jsonl``: one line per sample, appended chunk by chunk, read back to resume.

A record is keyed by (benchmark, problem_index, sample_index) and holds the prompt, response,
extracted answer, correctness and token count. Lines are only ever appended, one chunk per
``write`` followed by fsync, so a killed run leaves complete chunks plus at most one torn
last line, which ``load_samples`` cuts off before the run appends again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SampleKey = tuple[str, int, int]  # (benchmark, problem_index, sample_index)

REQUIRED = ("benchmark", "problem_index", "sample_index", "response", "answer", "correct", "num_tokens")


def sample_key(record: dict) -> SampleKey:
    return record["benchmark"], int(record["problem_index"]), int(record["sample_index"])


def load_samples(path: str | Path, repair: bool = True) -> dict[SampleKey, dict]:
    """Every complete record of ``path`` by key ({} when the file does not exist).

    A malformed line is an error naming the file and line, except the last one when it lacks
    its newline: that is the torn write of a killed run, and with ``repair`` the file is
    truncated to the end of the last complete line so the next append starts clean.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends in a newline
    out: dict[SampleKey, dict] = {}
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            missing = [k for k in REQUIRED if k not in record]
            if missing:
                raise ValueError(f"missing field(s) {missing}")
        except ValueError as err:
            raise ValueError(f"{path}: line {lineno} is not a sample record ({err})") from err
        out[sample_key(record)] = record
    if torn and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))
    return out


def append_samples(path: str | Path, records: list[dict]) -> None:
    """Append ``records`` in one write, then fsync, so a chunk lands whole or as a torn tail."""
    if not records:
        return
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
