"""Evaluate a training run's checkpoints and plot accuracy against step.

Layout (written by the trainer): ``RUN/checkpoints/step_000010/policy/`` holds a save_pretrained
model and tokenizer. Evaluations go to ``RUN/eval/step_000010/`` (results.json, samples.jsonl,
...), the same place the trainer's in-loop ``evaluate`` writes, so both paths feed one curve:
``RUN/eval/accuracy_vs_step.png`` and ``RUN/eval/steps.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .layout import STEP_DIR, step_dir_name, step_results
from .settings import EvalSettings


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, policy directory) of every saved checkpoint, by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(f"--run: {run_dir} has no checkpoints/ directory")
    out = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / "policy").is_dir():
            out.append((int(m.group(1)), d / "policy"))
    return sorted(out)


def summarize_steps(eval_root: str | Path) -> str:
    """Write ``accuracy_vs_step.png`` and ``steps.md`` under ``eval_root``; returns the table."""
    from .plots import plot_accuracy_vs_step
    from .report import table1

    steps = step_results(eval_root)
    if not steps:
        raise FileNotFoundError(f"{eval_root}: no step_*/results.json to summarize")
    plot_accuracy_vs_step(steps, Path(eval_root) / "accuracy_vs_step.png")
    table = table1([(f"step {s}", r) for s, r in steps])
    (Path(eval_root) / "steps.md").write_text(table + "\n")
    return table


def evaluate_step(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    problems_by_benchmark: dict[str, list],
    settings: EvalSettings,
    *,
    generator=None,
    progress: bool = False,
) -> dict:
    """The trainer's in-loop hook: evaluate the in-memory policy at ``step`` into
    ``RUN/eval/step_XXXXXX/`` and refresh the run's accuracy-vs-step plot and table."""
    from .harness import evaluate

    results = evaluate(
        model,
        tokenizer,
        problems_by_benchmark,
        settings,
        Path(run_dir) / "eval" / step_dir_name(step),
        generator=generator,
        model_name=f"{Path(run_dir).name}@{step}",
        progress=progress,
    )
    summarize_steps(Path(run_dir) / "eval")
    return results


def evaluate_checkpoints(
    run_dir: str | Path,
    settings: EvalSettings,
    problems_by_benchmark: dict[str, list],
    *,
    every: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> list[tuple[int, dict]]:
    """Evaluate every saved checkpoint (or those whose step is a multiple of ``every``).

    A checkpoint whose results.json already exists with these settings is not reloaded; one
    interrupted midway resumes from its samples.jsonl. Returns (step, results) for all
    evaluated steps of the run, including ones the trainer evaluated in-loop.
    """
    from .harness import CONFIG, RESULTS, evaluate
    from .loading import dtype_name, load_for_eval

    eval_root = Path(run_dir) / "eval"
    ckpts = [(s, p) for s, p in find_checkpoints(run_dir) if not every or s % every == 0]
    if not ckpts:
        raise FileNotFoundError(
            f"--run: no checkpoints/step_*/policy under {run_dir}"
            + (f" with step divisible by {every}" if every else "")
        )
    dtype_run = dtype_name(dtype, device, settings.backend)
    for step, policy in ckpts:
        out = eval_root / step_dir_name(step)
        if (out / RESULTS).exists():
            old = json.loads((out / RESULTS).read_text())
            recorded = json.loads((out / CONFIG).read_text()).get("dtype") if (out / CONFIG).exists() else None
            if old.get("settings") == settings.to_dict() and list(old["benchmarks"]) == list(
                problems_by_benchmark
            ) and recorded == dtype_run:
                continue
        model, tok, gen = load_for_eval(str(policy), settings, dtype, device)
        evaluate(
            model,
            tok,
            problems_by_benchmark,
            settings,
            out,
            generator=gen,
            model_name=str(policy),
            dtype=dtype_run,
            progress=progress,
        )
        gen.close()  # a vLLM engine holds GBs of KV cache; free it before the next checkpoint
        del model, gen
    summarize_steps(eval_root)
    return step_results(eval_root)
