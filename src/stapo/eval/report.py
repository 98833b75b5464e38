"""Markdown tables: the paper's Table 1 layout (one row per model, avg@N per benchmark, Avg.)
and a per-benchmark detail table (stderr, pass@k, maj@k, lengths)."""

from __future__ import annotations

import json
from pathlib import Path

from .layout import step_results

DISPLAY = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "math500": "MATH500",
    "minerva": "Minerva",
    "olympiadbench": "Olympiad",
}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table1(runs: list[tuple[str, dict]]) -> str:
    """Rows = runs (label, results), columns = benchmarks then Avg.; cells are avg@N in %.

    A benchmark a run lacks shows "–"; Avg. is each run's own macro average, so compare it only
    between rows that cover the same benchmarks.
    """
    benches: list[str] = []
    for _, res in runs:
        benches += [b for b in res["benchmarks"] if b not in benches]
    header = ["Model"]
    for b in benches:
        ns = {res["benchmarks"][b]["n_samples"] for _, res in runs if b in res["benchmarks"]}
        n = f"avg@{ns.pop()}" if len(ns) == 1 else "avg@N"
        header.append(f"{DISPLAY.get(b, b)} ({n})")
    header.append("Avg.")
    rows = []
    for label, res in runs:
        cells = [_pct(res["benchmarks"][b]["avg"]) if b in res["benchmarks"] else "–" for b in benches]
        rows.append([label, *cells, _pct(res["macro"]["avg"])])
    return _md(header, rows)


def detail_table(results: dict) -> str:
    """One row per benchmark: N, problems, avg@N ± stderr, pass@k, maj@k (all in %), lengths."""
    header = [
        "Benchmark",
        "N",
        "Problems",
        "avg@N ± se",
        "pass@k (k=1,2,4,..,N)",
        "maj@k",
        "Mean tokens",
        "Truncated",
    ]
    rows = []
    for b, m in results["benchmarks"].items():
        rows.append(
            [
                DISPLAY.get(b, b),
                str(m["n_samples"]),
                str(m["n_problems"]),
                f"{_pct(m['avg'])} ± {_pct(m['avg_stderr'])}",
                " / ".join(_pct(v) for v in m["pass_at_k"].values()),
                " / ".join(_pct(v) for v in m.get("maj_at_k", {}).values()),
                f"{m['mean_tokens']:.1f}",
                _pct(m["truncated_frac"]),
            ]
        )
    mac = results["macro"]
    rows.append(["Avg.", "", "", f"{_pct(mac['avg'])} ± {_pct(mac['avg_stderr'])}", "", "", "", ""])
    return _md(header, rows)


def load_results(path: str | Path) -> tuple[str, dict]:
    """(label, results) for a results.json, an eval output directory, or a training run.

    A training run directory (``RUN/eval/step_*/results.json``) contributes its latest step,
    labelled ``RUN@step``.
    """
    p = Path(path)
    if p.is_file():
        return p.parent.name, json.loads(p.read_text())
    if (p / "results.json").exists():
        return p.name, json.loads((p / "results.json").read_text())
    steps = step_results(p / "eval")
    if steps:
        step, res = steps[-1]
        return f"{p.name}@{step}", res
    raise FileNotFoundError(f"{p}: no results.json, and no eval/step_*/results.json under it")
