"""Where a run's evaluations live: ``RUN/eval/step_000010/results.json`` (a leaf module, so the
checkpoint evaluator, the plots and the report can all read it without importing each other)."""

from __future__ import annotations

import json
import re
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_results(eval_root: str | Path) -> list[tuple[int, dict]]:
    """(step, results) for every ``eval_root/step_*/results.json``, by step."""
    root = Path(eval_root)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = STEP_DIR.match(d.name)
            if m and (d / "results.json").exists():
                out.append((int(m.group(1)), json.loads((d / "results.json").read_text())))
    return sorted(out, key=lambda t: t[0])
