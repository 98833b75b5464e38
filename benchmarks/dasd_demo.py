"""DASD on the demo task (issue 10): objectives × RL seeds, plus a β sweep of `dasd`.

Every run is ``python -m stapo train`` on the built-in demo config (``stapo.config.DEMO``: P = 16
prompts × G = 8 samples a step, lr 5e-5, max 40 new tokens, ``distill.hint_template=demo``) with
only these overrides: ``steps``, ``data.heldout_size``, ``eval_samples`` (avg@k at temperature 1),
``threads``, ``eval_every=0`` (evaluate before and after), ``diagnostics.dump_every=0``, and
``model.name_or_path`` = ONE demo base model (built once with ``--base-seed``) shared by every run,
so runs differ only by objective, β and the RL seed (problem order, sampling).

Reported per run (from its metrics.jsonl): held-out avg@k before and after RL, greedy accuracy
after, the rollout policy's mean token entropy (``diag/entropy/mean``) over the last ``--tail``
steps ("final entropy"), the training reward over the same steps, and for the self-distillation
objectives the attracted / repelled fractions and the teacher–student KL.

Run (the recorded results; see RESULTS_dasd.md):
  .venv/bin/python benchmarks/dasd_demo.py --steps 30 --heldout 64 --eval-samples 8 --jobs 2 \\
      --out /tmp/dasd_bench --markdown benchmarks/RESULTS_dasd.md
Runs already finished under --out are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import (
    machine_description,
    markdown_table,
    mean_sd,
    read_metrics,
    run_grid,
    run_training,
    write_report,
)

from stapo.config.train import DEMO

OBJECTIVES = ["grpo", "stapo", "opsd", "dasd_reverse", "dasd"]
DISTILL = {"opsd", "dasd_reverse", "dasd"}
DEFAULT_BETA = 0.1  # the dasd default (stapo.objectives.dasd.SelfDistillConfig.beta)


def run_name(objective: str, seed: int, beta: float | None) -> str:
    return f"{objective}-s{seed}" if beta is None else f"{objective}-beta{beta:g}-s{seed}"


def train_command(args, base: Path, objective: str, seed: int, beta: float | None, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "stapo", "train", f"objective.name={objective}", f"seed={seed}",
           f"model.name_or_path={base}", f"output_dir={out}", f"run_name={run_name(objective, seed, beta)}",
           f"steps={args.steps}", f"save_every={args.steps}", "eval_every=0", f"eval_samples={args.eval_samples}",
           f"data.heldout_size={args.heldout}", f"threads={args.threads}", "diagnostics.dump_every=0",
           "reward.num_workers=1"]
    if beta is not None:
        cmd.append(f"objective.options={{beta: {beta}}}")
    return cmd


def summarise(run_dir: Path, tail: int) -> dict | None:
    """Numbers of one finished run, or None when it did not finish."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    if len(evals) < 2:
        return None
    steps = [r for r in rows if r["step"] > 0][-tail:]

    def mean(key):
        vals = [r[key] for r in steps if key in r]
        return sum(vals) / len(vals) if vals else None

    return {
        "acc_before": evals[0]["eval/accuracy"], "acc_after": evals[-1]["eval/accuracy"],
        "greedy_before": evals[0]["eval/greedy_accuracy"], "greedy_after": evals[-1]["eval/greedy_accuracy"],
        "entropy_final": mean("diag/entropy/mean"), "entropy_first": rows[1].get("diag/entropy/mean"),
        "reward_tail": mean("reward/mean"), "attract": mean("distill/attract_fraction"),
        "repel": mean("distill/repel_fraction"), "kl_teacher": mean("distill/kl_teacher"),
        "steps": evals[-1]["step"], "step_s": mean("time/step"),
    }


def launch(args, base: Path, spec: tuple, out: Path, previous: dict) -> dict:
    objective, seed, beta = spec
    run_dir = out / run_name(objective, seed, beta)
    done = summarise(run_dir, args.tail)
    if done is not None and done["steps"] == args.steps:
        wall = previous.get(run_name(objective, seed, beta), {}).get("wall_s")
        return {"objective": objective, "seed": seed, "beta": beta, "reused": True, "wall_s": wall, **done}
    log = out / f"{run_name(objective, seed, beta)}.log"
    wall = run_training(train_command(args, base, objective, seed, beta, out), run_dir, log, args.threads, ROOT)
    result = summarise(run_dir, args.tail)
    if result is None:
        raise RuntimeError(f"{run_name(objective, seed, beta)} finished without its evaluations; see {log}")
    print(f"done {run_name(objective, seed, beta)} in {wall:.0f}s: avg@{args.eval_samples} "
          f"{result['acc_before']:.3f} -> {result['acc_after']:.3f}, H {result['entropy_final']:.3f}", flush=True)
    return {"objective": objective, "seed": seed, "beta": beta, "wall_s": wall, **result}


def pct_or_plain(values: list[float], pct: bool = True) -> str:
    return mean_sd(values) if pct else mean_sd(values, 1.0, "{:.3f}")


def _run_time(results: list[dict], jobs: int) -> str:
    walls = [r["wall_s"] for r in results if r.get("wall_s")]
    if not walls:
        return ""
    return (f"run wall time {statistics.fmean(walls):.0f} s on average (each run includes two evaluations); "
            f"all {len(walls)} timed runs ≈ {sum(walls) / jobs / 60:.1f} min of grid wall time.")


def markdown(args, results: list[dict], machine: str, wall: float) -> str:
    k = args.eval_samples
    lines = [
        "## DASD on the demo task (issue 10)",
        "",
        (f"Command: `.venv/bin/python benchmarks/dasd_demo.py --steps {args.steps} --heldout {args.heldout} "
        f"--eval-samples {k} --jobs {args.jobs} --threads {args.threads} --seeds {' '.join(map(str, args.seeds))} "
        f"--betas {' '.join(f'{b:g}' for b in args.betas)} --sweep-seeds {' '.join(map(str, args.sweep_seeds))}`"),
        "",
        (f"Machine: {machine}. {len(results)} runs, {args.jobs} at a time with {args.threads} thread each; "
         f"{_run_time(results, args.jobs)} This invocation: {wall / 60:.1f} min wall."),
        "",
        (f"Set-up: the built-in demo config (P = 16 × G = 8 rollouts a step, M = {DEMO['optim']['mini_batch_prompts']} prompts an optimizer step, lr 5e-5, ≤ 40 new tokens) for "
        f"**{args.steps} RL steps** (the demo's default is {DEMO['steps']}), one demo base model (seed {args.base_seed}) "
        f"shared by all runs; seeds are RL seeds. Held-out: avg@{k} = mean accuracy of {k} samples at "
        f"temperature 1 on {args.heldout} held-out problems, before and after RL (the same {args.heldout} problems "
        f"and evaluation seed for every objective at a given RL seed). Final entropy: the rollout policy's mean "
        f"token entropy over the last {args.tail} steps. Mean ± sample SD over seeds; accuracies in %."),
        "",
    ]
    main = [r for r in results if r["beta"] is None]
    rows = []
    for obj in OBJECTIVES:
        rs = [r for r in main if r["objective"] == obj]
        if not rs:
            continue
        delta = [r["acc_after"] - r["acc_before"] for r in rs]
        rows.append([f"`{obj}`", pct_or_plain([r["acc_before"] for r in rs]), pct_or_plain([r["acc_after"] for r in rs]),
                     pct_or_plain(delta), pct_or_plain([r["greedy_after"] for r in rs]),
                     pct_or_plain([r["entropy_final"] for r in rs], pct=False),
                     pct_or_plain([r["reward_tail"] for r in rs]),
                     pct_or_plain([r["repel"] for r in rs], pct=True) if obj in DISTILL else "-",
                     pct_or_plain([r["kl_teacher"] for r in rs], pct=False) if obj in DISTILL else "-",
                     " / ".join(f"{100 * r['acc_after']:.1f}" for r in sorted(rs, key=lambda r: r["seed"]))])
    lines += [markdown_table(
        ["objective", f"avg@{k} before", f"avg@{k} after", "Δ", "greedy after", "final entropy",
         f"train reward (last {args.tail})", "repelled %", "KL(student‖teacher)", "after, per seed"], rows), ""]
    sweep = [r for r in results if r["objective"] == "dasd" and (r["beta"] is not None or r["seed"] in args.sweep_seeds)]
    if args.betas:
        srows = []
        for beta in sorted({DEFAULT_BETA if r["beta"] is None else r["beta"] for r in sweep}):
            rs = [r for r in sweep if (DEFAULT_BETA if r["beta"] is None else r["beta"]) == beta
                  and r["seed"] in args.sweep_seeds]
            srows.append([f"{beta:g}" + (" (default)" if beta == DEFAULT_BETA else "") + (" ≡ justrl" if beta == 0 else ""),
                          pct_or_plain([r["acc_after"] - r["acc_before"] for r in rs]),
                          pct_or_plain([r["acc_after"] for r in rs]), pct_or_plain([r["entropy_final"] for r in rs], pct=False),
                          pct_or_plain([r["repel"] for r in rs]), pct_or_plain([r["kl_teacher"] for r in rs], pct=False),
                          len(rs)])
        lines += [f"β sweep of `dasd` (seeds {', '.join(map(str, args.sweep_seeds))}; β = 0 is exactly `justrl`):", "",
                  markdown_table(["β", "Δ avg@k", f"avg@{k} after", "final entropy", "repelled %",
                                  "KL(student‖teacher)", "runs"], srows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--betas", type=float, nargs="*", default=[0.0, 0.3, 1.0], help="dasd β sweep (0.1 is the grid's)")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--tail", type=int, default=5, help="steps averaged for the final entropy / reward")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/dasd_bench"))
    p.add_argument("--markdown", type=Path, default=None, help="write the result fragment here")
    args = p.parse_args(argv)

    import torch

    from stapo.demo.assets import build_base_model

    torch.set_num_threads(max(1, args.threads * args.jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    base = build_base_model(args.out / "_demo_base" / f"seed{args.base_seed}", seed=args.base_seed)
    specs = [(o, s, None) for o in args.objectives for s in args.seeds]
    specs += [("dasd", s, b) for b in args.betas for s in args.sweep_seeds]
    saved = args.out / "results.json"
    previous = {run_name(r["objective"], r["seed"], r["beta"]): r for r in json.loads(saved.read_text())} \
        if saved.exists() else {}
    results, wall = run_grid(lambda spec: launch(args, base, spec, args.out, previous), specs, args.jobs)
    write_report(args.out, results, markdown(args, results, machine, wall), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
