"""The end-of-run summary table (held-out accuracy before and after RL, entropy, masked fraction, time)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .logger import read_metrics


def run_summary(run_dir: str | Path) -> dict[str, float | None]:
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r["step"] > 0]
    first_eval = next((r for r in rows if "eval/accuracy" in r), {})
    last_eval = next((r for r in reversed(rows) if "eval/accuracy" in r and r["step"] > 0), {})
    tail = train_rows[-10:]

    def mean(key):
        return _run_mean(tail, key)

    # the update's entropy where the objective computes it, else the rollout policy's (diagnostics)
    entropy = mean("actor/entropy")
    if entropy is None:
        entropy = mean("diag/entropy/mean")
    return {
        "steps": train_rows[-1]["step"] if train_rows else 0,
        "accuracy_before": first_eval.get("eval/accuracy"),
        "accuracy_after": last_eval.get("eval/accuracy"),
        "greedy_before": first_eval.get("eval/greedy_accuracy"),
        "greedy_after": last_eval.get("eval/greedy_accuracy"),
        "entropy_final": entropy,
        "masked_fraction": mean("s2t/masked_fraction"),
        "masked_fraction_run": _run_mean(train_rows, "s2t/masked_fraction"),
        "silenced_tokens": _run_sum(train_rows, "s2t/silenced"),
        "train_time_s": sum(r.get("time/step", 0.0) for r in train_rows),
    }


def _run_mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _run_sum(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) if vals else None


def print_summary(run_dir: str | Path) -> None:
    s = run_summary(run_dir)
    table = Table(title=f"stapo run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v, pct=False):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.4g}"

    table.add_row("steps", str(s["steps"]))
    table.add_row("held-out accuracy (sampled), before RL", fmt(s["accuracy_before"], True))
    table.add_row("held-out accuracy (sampled), after RL", fmt(s["accuracy_after"], True))
    table.add_row("held-out accuracy (greedy), before RL", fmt(s["greedy_before"], True))
    table.add_row("held-out accuracy (greedy), after RL", fmt(s["greedy_after"], True))
    table.add_row("entropy (last 10 steps)", fmt(s["entropy_final"]))
    table.add_row("S2T masked fraction (last 10 steps)", fmt(s["masked_fraction"]))
    table.add_row("S2T masked fraction (whole run; the paper: ~1e-4)", fmt(s["masked_fraction_run"]))
    table.add_row("S2T silenced tokens (whole run)", fmt(s["silenced_tokens"]))
    table.add_row("RL time (s)", f"{s['train_time_s']:.0f}")
    Console().print(table)
