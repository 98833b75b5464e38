"""The objectives on the built-in demo task (issue 4): the six-objective table and the stress setting.

Every run is ``python -m stapo train`` on the built-in demo config (``stapo.config.DEMO``, what
``make demo ALGO=<objective> SEED=<s>`` runs) with only operational overrides (``output_dir``,
``run_name``, ``threads``, ``save_every``, ``diagnostics.dump_every=0``, ``reward.num_workers=1``)
and ``model.name_or_path`` = the demo base model of that seed (built and cached exactly as
``make demo`` does, under ``--base-cache``). So seed s of every objective starts from the same
model, sees the same held-out problems and differs only by the objective.

Two grids:
  default   the six objectives × seeds at the demo's settings
  --stress  the collapse stress setting: lr raised (``--lr``, default 3e-4), a longer run, GRPO
            versus STAPO at each τ_p of ``--prob-thresholds`` (0.002 is the paper's)
``--task demo_words`` runs either grid on the worded task (``configs/demo_words.yaml``, issue 16),
where S2T's mask fires; ``--sweep`` adds STAPO at each τ_p of ``--prob-thresholds`` to the default
grid; ``--figure PNG`` draws entropy and held-out accuracy against step, mean ± SD over seeds.

Reported per run (its metrics.jsonl): held-out accuracy (``eval/accuracy``: mean of the demo's
samples at temperature 1; ``eval/greedy_accuracy``) before and after RL, the lowest and highest
accuracy seen after step 0, the current policy's mean token entropy over the last ``--tail``
steps (``diag/entropy/mean``, the rollout policy's, logged for every objective), the mean S2T masked fraction, and the largest gradient norm.

Run (the recorded results; see BENCHMARKS.md):
  .venv/bin/python benchmarks/demo_objectives.py --jobs 2 --markdown benchmarks/RESULTS_demo_objectives.md
  .venv/bin/python benchmarks/demo_objectives.py --stress --seeds 0 --steps 300 --jobs 2 \\
      --markdown benchmarks/RESULTS_demo_stress.md
Runs already finished under --out are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import itertools
import math
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

OBJECTIVES = ["stapo", "justrl", "grpo", "dapo", "dr_grpo", "entropy20"]


def variants(args) -> list[tuple[str, str, dict]]:
    """(label, objective name, objective options) of the grid."""
    if not args.stress:
        sweep = [(f"stapo τ_p={t:g}", "stapo", {"prob_threshold": t}) for t in args.prob_thresholds
                 if t != 0.002] if args.sweep else []
        return [(o, o, {}) for o in args.objectives] + sweep
    return [("grpo", "grpo", {})] + [(f"stapo τ_p={t:g}", "stapo", {"prob_threshold": t}) for t in args.prob_thresholds]


def run_name(label: str, seed: int) -> str:
    return label.replace(" τ_p=", "-tp").replace(" ", "_") + f"-s{seed}"


def train_command(args, base: Path, objective: str, options: dict, seed: int, name: str) -> list[str]:
    config = [] if args.task == "demo" else [str(ROOT / "configs" / f"{args.task}.yaml")]
    cmd = [sys.executable, "-m", "stapo", "train", *config, f"objective.name={objective}", f"seed={seed}",
           f"model.name_or_path={base}", f"output_dir={args.out}", f"run_name={name}", f"threads={args.threads}",
           f"save_every={args.steps or 10**9}", "diagnostics.dump_every=0", "reward.num_workers=1"]
    if args.steps:
        cmd.append(f"steps={args.steps}")
    if args.lr:
        cmd.append(f"optim.lr={args.lr}")
    if options:
        cmd.append("objective.options={" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}")
    cmd.extend(args.set)  # e.g. the arithmetic demo's geometry on demo_words: rollout.prompts_per_step=16 ...
    return [*cmd, "--quiet"]  # after the overrides: argparse ends the positionals at an option


def summarise(run_dir: Path, tail: int) -> dict | None:
    """The numbers of one finished run (None when it did not finish)."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "diag/entropy/mean" in r]  # logged for every objective
    if len(evals) < 2 or not train or not (run_dir / "plots").exists():
        return None
    after = evals[1:]
    peak = max(range(len(evals)), key=lambda i: evals[i]["eval/accuracy"])
    return {
        "acc_peak": evals[peak]["eval/accuracy"], "peak_step": evals[peak]["step"],
        "greedy_peak": evals[peak]["eval/greedy_accuracy"],
        "acc_low_after_peak": min((r["eval/accuracy"] for r in evals[peak + 1 :]), default=None),
        "entropy_curve": [(r["step"], r["diag/entropy/mean"]) for r in train],
        "greedy_curve": [(r["step"], r["eval/greedy_accuracy"]) for r in evals],
        "steps": rows[-1]["step"],
        "acc_before": evals[0]["eval/accuracy"], "acc_after": evals[-1]["eval/accuracy"],
        "greedy_before": evals[0]["eval/greedy_accuracy"], "greedy_after": evals[-1]["eval/greedy_accuracy"],
        "acc_min": min(r["eval/accuracy"] for r in after), "acc_max": max(r["eval/accuracy"] for r in after),
        "curve": [(r["step"], r["eval/accuracy"]) for r in evals],
        "entropy_final": statistics.fmean(r["diag/entropy/mean"] for r in train[-tail:]),
        "entropy_max": max(r["diag/entropy/mean"] for r in train),
        "masked_fraction": statistics.fmean(r.get("s2t/masked_fraction", 0.0) for r in train),
        "grad_norm_max": max(r["actor/grad_norm"] for r in train),
        "train_s": sum(r.get("time/step", 0.0) for r in rows),
    }


def launch(args, bases: dict[int, Path], spec: tuple) -> dict:
    (label, objective, options), seed = spec
    name = run_name(label, seed)
    run_dir = args.out / name
    out = {"label": label, "objective": objective, "seed": seed}
    done = summarise(run_dir, args.tail)
    if done is not None and (not args.steps or done["steps"] == args.steps):
        return {**out, "reused": True, **done}
    wall = run_training(train_command(args, bases[seed], objective, options, seed, name), run_dir,
                        args.out / f"{name}.log", args.threads, ROOT)
    result = summarise(run_dir, args.tail)
    if result is None:
        raise RuntimeError(f"{name} finished without its evaluations; see {args.out / (name + '.log')}")
    print(f"done {name} in {wall:.0f}s: {result['acc_before']:.3f} -> {result['acc_after']:.3f}, "
          f"H {result['entropy_final']:.3f}", flush=True)
    return {**out, "wall_s": wall, **result}


def markdown(args, results: list[dict], machine: str, wall: float, bases: dict[int, Path]) -> str:
    title = ("Stress setting" if args.stress else "Objectives") + (f" on `{args.task}`" if args.task != "demo" else "")
    cmd = "benchmarks/demo_objectives.py" + (" --stress" if args.stress else "")
    cmd += f" --seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs} --threads {args.threads}"
    cmd += (f" --steps {args.steps}" if args.steps else "") + (f" --lr {args.lr:g}" if args.lr else "")
    cmd += (f" --task {args.task}" if args.task != "demo" else "") + (" --sweep" if args.sweep else "")
    if args.sweep or args.stress:
        cmd += " --prob-thresholds " + " ".join(f"{t:g}" for t in args.prob_thresholds)
    cmd += (" --set " + " ".join(args.set)) if args.set else ""
    if not args.stress and args.objectives != OBJECTIVES:
        cmd += " --objectives " + " ".join(args.objectives)
    cmd += (" --paired " + " ".join(args.paired)) if args.paired else ""
    cmd += f" --bases {args.bases}" if args.bases else ""
    steps = results[0]["steps"]
    walls = [r["wall_s"] for r in results if r.get("wall_s")]
    lines = [
        f"### {title}", "",
        f"Command: `.venv/bin/python {cmd}`", "",
        (f"Machine: {machine}. {len(results)} runs, {args.jobs} at a time with {args.threads} thread each"
         + (f"; a run took {statistics.fmean(walls):.0f} s wall on average" if walls else "")
         + f"; this invocation {wall / 60:.1f} min wall."), "",
        (f"Set-up: the `make demo` config ({steps} RL steps"
         + (f", **lr {args.lr:g}**" if args.lr else "") + "), the demo base model of each seed ("
         + ", ".join(f"seed {s}: `{p.name}`" for s, p in sorted(bases.items())) + "). Held-out accuracy: "
         "the demo's evaluation (256 held-out problems, 4 samples each at temperature 1, and greedy), "
         "before RL and after the last step; min / max: over the evaluations after step 0. Final entropy: the "
         f"rollout policy's mean token entropy over the last {args.tail} steps. Mean ± sample SD over seeds; "
         "accuracies in %."), "",
    ]
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        rs = sorted((r for r in results if r["label"] == label), key=lambda r: r["seed"])
        delta = [r["acc_after"] - r["acc_before"] for r in rs]
        rows.append([f"`{label}`", len(rs), mean_sd([r["acc_before"] for r in rs]), mean_sd([r["acc_after"] for r in rs]),
                     mean_sd(delta), " / ".join(f"{100 * d:+.1f}" for d in delta),
                     f"{sum(d < 0 for d in delta)}/{len(delta)}",
                     f"{sum(r['acc_min'] < r['acc_before'] for r in rs)}/{len(rs)}",
                     mean_sd([r["greedy_after"] - r["greedy_before"] for r in rs]),
                     mean_sd([r["acc_min"] for r in rs]), mean_sd([r["acc_max"] for r in rs]),
                     mean_sd([r["entropy_final"] for r in rs], 1.0, "{:.3f}"),
                     mean_sd([r["entropy_max"] for r in rs], 1.0, "{:.3f}"),
                     mean_sd([r["masked_fraction"] for r in rs], 1.0, "{:.1e}"),
                     mean_sd([r["grad_norm_max"] for r in rs], 1.0, "{:.2f}")])
    lines += [markdown_table(
        ["objective", "seeds", "sampled before", "sampled after", "Δ", "Δ per seed", "ended below start",
         "ever below start", "greedy Δ", "min after 0",
         "max after 0", "final entropy", "max entropy", "S2T masked fraction", "max grad norm"], rows), ""]
    lines += [("Peak and after (sampled / greedy held-out accuracy %, mean ± SD over seeds; the lowest evaluation "
              "after each seed's peak, '-' when the peak is the last evaluation):"), ""]
    prow = []
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label]
        low = [r["acc_low_after_peak"] for r in rs if r.get("acc_low_after_peak") is not None]
        prow.append([f"`{label}`", mean_sd([r["acc_peak"] for r in rs]), mean_sd([r["greedy_peak"] for r in rs]),
                     " / ".join(str(r["peak_step"]) for r in rs), mean_sd(low), mean_sd([r["acc_after"] for r in rs]),
                     mean_sd([r["greedy_after"] for r in rs]),
                     mean_sd([r["train_s"] for r in rs], 1.0, "{:.0f}")])
    lines += [markdown_table(["objective", "peak sampled", "peak greedy", "peak step per seed",
                              "lowest after peak", "end sampled", "end greedy", "RL step s (contended)"], prow), ""]
    if args.paired:
        lines += paired_lines(results, *args.paired)
    lines += ["Held-out accuracy curves (%, every evaluation):", ""]
    lines += [markdown_table(["objective", "seed", "accuracy by step"], [
        [f"`{r['label']}`", r["seed"], " → ".join(f"{100 * a:.1f}" for _, a in r["curve"])]
        for r in sorted(results, key=lambda r: (r["label"], r["seed"]))]), ""]
    return "\n".join(lines)


def t_quantile(p: float, df: int) -> float:
    """Student t quantile by bisection on its CDF (Simpson's rule on the density); no scipy here."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_comparison(a: dict[int, float], b: dict[int, float]) -> dict:
    """a − b over the seeds both have (each seed: one shared base and held-out set): the mean
    difference, its 95% t-interval, and the exact two-sided sign-flip permutation p-value."""
    seeds = sorted(a.keys() & b.keys())
    d = [a[s] - b[s] for s in seeds]
    n, mean = len(d), statistics.fmean(d)
    half = t_quantile(0.975, n - 1) * statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    flips = [abs(sum(x * f for x, f in zip(d, signs))) / n for signs in itertools.product((1, -1), repeat=n)]
    p = sum(m >= abs(mean) - 1e-12 for m in flips) / len(flips)
    return {"n": n, "diff": d, "mean": mean, "ci": (mean - half, mean + half), "p_sign_flip": p}


def paired_lines(results: list[dict], a: str, b: str) -> list[str]:
    """The paired comparison of two objectives on Δ (after − before) and on the final accuracy."""
    by = {label: {r["seed"]: r for r in results if r["label"] == label} for label in (a, b)}
    rows = []
    for what, key in (("Δ (after − before)", lambda r: r["acc_after"] - r["acc_before"]),
                      ("sampled after", lambda r: r["acc_after"]), ("min after 0", lambda r: r["acc_min"])):
        c = paired_comparison({s: key(r) for s, r in by[a].items()}, {s: key(r) for s, r in by[b].items()})
        rows.append([what, c["n"], f"{100 * c['mean']:+.2f}", f"[{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}]",
                     f"{c['p_sign_flip']:.3f}", " / ".join(f"{100 * x:+.1f}" for x in c["diff"])])
    sd = {label: statistics.stdev([r["acc_after"] - r["acc_before"] for r in by[label].values()]) for label in (a, b)}
    return [(f"Paired comparison, `{a}` − `{b}`, seed by seed (each seed: one base model and one held-out set "
             f"for both; accuracy points). 95% CI: Student t over the seeds; p: exact two-sided sign-flip "
             f"permutation test (all 2^n sign patterns). SD of Δ over seeds: `{a}` {100 * sd[a]:.1f}, "
             f"`{b}` {100 * sd[b]:.1f}."), "",
            markdown_table(["measure", "seeds", "mean difference", "95% CI", "p (sign flip)", "per seed"], rows), ""]


def plot_curves(results: list[dict], path: Path) -> None:
    """Entropy (every step) and held-out sampled accuracy (every evaluation) against step, mean ± SD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_h, ax_a) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label]
        for ax, key in ((ax_h, "entropy_curve"), (ax_a, "curve")):
            n = min(len(r[key]) for r in rs)
            steps = np.array([s for s, _ in rs[0][key][:n]])
            vals = np.array([[v for _, v in r[key][:n]] for r in rs])
            m, sd = vals.mean(0), vals.std(0, ddof=1) if len(rs) > 1 else np.zeros(n)
            ax.plot(steps, m, label=f"{label} (n={len(rs)})")
            ax.fill_between(steps, m - sd, m + sd, alpha=0.2)
    ax_h.set(xlabel="step", ylabel="mean token entropy (rollout policy, nats)", title="Entropy")
    ax_a.set(xlabel="step", ylabel="held-out sampled accuracy", title="Accuracy (T = 1)")
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    p.add_argument("--stress", action="store_true", help="GRPO vs STAPO at each τ_p, at --lr")
    p.add_argument("--task", default="demo", help="demo task: demo or demo_words (configs/<task>.yaml)")
    p.add_argument("--sweep", action="store_true", help="default grid: also STAPO at each --prob-thresholds τ_p")
    p.add_argument("--figure", type=Path, default=None, help="entropy and accuracy vs step, PNG")
    p.add_argument("--prob-thresholds", type=float, nargs="+", default=[0.002, 0.01, 0.05])
    p.add_argument("--lr", type=float, default=None, help="optim.lr (default: the demo's; --stress: 3e-4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's)")
    p.add_argument("--tail", type=int, default=10, help="steps averaged for the final entropy")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base-cache", type=Path, default=ROOT / "runs" / "_demo_base",
                   help="where `make demo` caches its base models (one folder per seed)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (e.g. optim.mini_batch_prompts=4)")
    p.add_argument("--markdown", type=Path, default=None, help="write the result fragment here")
    p.add_argument("--bases", type=int, default=None, metavar="N",
                   help="RL seed s starts from the base model of seed s %% N (default: its own)")
    p.add_argument("--paired", nargs=2, default=None, metavar=("A", "B"),
                   help="also report A − B seed by seed: mean, 95%% CI, sign-flip p")
    args = p.parse_args(argv)
    if args.stress and args.lr is None:
        args.lr = 3e-4
    args.out = args.out or Path("/tmp") / ("demo_stress" if args.stress else "demo_objectives")

    import torch

    from stapo.demo.assets import build_base_model

    torch.set_num_threads(max(1, args.threads * args.jobs))
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    base_seed = {s: s % args.bases if args.bases else s for s in args.seeds}
    built = {b: build_base_model(args.base_cache / f"seed{b}", task=args.task, seed=b) for b in sorted(set(base_seed.values()))}
    bases = {s: built[b] for s, b in base_seed.items()}
    specs = [(v, s) for s in args.seeds for v in variants(args)]  # seed-major: a stopped grid leaves whole pairs
    results, wall = run_grid(lambda spec: launch(args, bases, spec), specs, args.jobs)
    write_report(args.out, results, markdown(args, results, machine, wall, bases), args.markdown)
    if args.figure:
        plot_curves(results, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
