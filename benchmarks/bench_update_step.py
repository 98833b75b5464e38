"""One RL step of `stapo train` per objective: what S2T costs in a step, and what the removed passes saved.

Set-up: the demo recipe (configs/demo.yaml: the warm-started demo model, P = 16 prompts × G = 8
samples, micro-batch 64, diagnostics on) with every response exactly 40 tokens
(``rollout.min_new_tokens = max_new_tokens``, so all objectives do the same work whatever they
sample), no held-out set. Two layouts: M = 4 prompts per optimizer step (the demo's and the paper's
P/M = 4) and M = P (one optimizer step). Every objective; S2T and 20-Entropy with
``objective.statistics`` current (the paper) and rollout (at M = P the two are the same run, so
only current is run). ``--baseline REV`` adds justrl and stapo from git revision REV (the code
before issue 18) at M = 4, for the before/after of the removed passes.

Each run is a fresh interpreter (`stapo.trainer.loop.train`, 1 torch thread) of ``--steps`` RL
steps; the first step is warm-up. Runs are interleaved: every repeat goes once through all
variants, so a burst of load on the shared machine hits all of them. Reported: medians over the
measured steps of all repeats of the step (generate + reward + update) and of its update part
(advantages, the no-grad passes, the update, diagnostics, the weight sync), as process CPU time
(user + system of the trainer process: what the run itself consumed, robust to other jobs on a
shared machine) and as wall time (the loop's ``time/step`` and ``time/update``), each also as a
ratio to ``justrl`` at the same layout.

Run (the recorded results, RESULTS_update_step.md):
  PYTHONPATH=src .venv/bin/python benchmarks/bench_update_step.py --steps 4 --repeats 2 --baseline a45b721
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_description, markdown_table, run_worker, worker_spec

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
OBJECTIVES = ("justrl", "grpo", "dapo", "dr_grpo", "entropy20", "stapo", "dasd", "opsd", "dasd_reverse")
WITH_STATISTICS = ("entropy20", "stapo")  # the objectives whose mask reads a policy's statistics


def worker(spec: dict) -> None:
    if spec.get("src"):
        sys.path.insert(0, spec["src"])
    import torch

    torch.set_num_threads(1)
    from stapo.config import build_config
    from stapo.trainer import loop

    # process CPU time (all threads) at three points of every step, by wrapping what the loop calls there:
    # the end of the previous step (its log call), the start of the update (attach_advantages) and its
    # end (_step_metrics). On a shared machine CPU time is what the run itself consumed.
    marks: dict[str, list[float]] = {"log": [], "update_start": [], "update_end": []}

    def mark(key, fn):
        def wrapped(*a, **k):
            if key != "log":
                marks[key].append(time.process_time())
            out = fn(*a, **k)
            if key == "log":
                marks[key].append(time.process_time())
            return out
        return wrapped

    loop.attach_advantages = mark("update_start", loop.attach_advantages)
    loop._step_metrics = mark("update_end", loop._step_metrics)
    loop.RunLogger.log = mark("log", loop.RunLogger.log)

    overrides = [
        f"objective.name={spec['objective']}", f"optim.mini_batch_prompts={spec['mini']}",
        f"steps={spec['steps']}", f"output_dir={spec['out']}", f"model.name_or_path={spec['model']}",
        "data.heldout=null", "rollout.min_new_tokens=40", "rollout.max_new_tokens=40", "save_every=1000",
        "threads=1", f"run_name={spec['name']}",
    ]
    if spec.get("statistics"):
        overrides.append(f"objective.statistics={spec['statistics']}")
    cfg = build_config(str(ROOT / "configs" / "demo.yaml"), overrides)
    run_dir = loop.train(cfg, quiet=True)
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("step", 0) >= 2]  # step 1 is warm-up
    log, start, end = marks["log"], marks["update_start"], marks["update_end"]  # log[0] is step 0's
    print(json.dumps({**spec, "step_s": [r["time/step"] for r in rows], "update_s": [r["time/update"] for r in rows],
                      "step_cpu_s": [log[k] - log[k - 1] for k in range(2, len(log))],
                      "update_cpu_s": [end[k] - start[k] for k in range(1, len(end))],
                      "response_length": [r["response/length_mean"] for r in rows]}))


def variants(P: int, baseline: str | None, layouts: tuple[int, ...] = (4, 16)) -> list[dict]:
    out = []
    for mini in layouts:
        for name in OBJECTIVES:
            stats = ("current", "rollout") if name in WITH_STATISTICS and mini < P else (None,)
            for s in stats:
                out.append({"objective": name, "mini": mini, "statistics": s, "label": name + (f" ({s})" if s else "")})
        if baseline and mini < P:
            for name in ("justrl", "stapo"):
                out.append({"objective": name, "mini": mini, "statistics": None, "baseline": True,
                            "label": f"{name} @ {baseline} (before)"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="RL steps per run; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="git revision whose justrl and stapo to time too")
    ap.add_argument("--out", default=str(HERE.parent / "RESULTS_update_step.md"))
    ap.add_argument("--only", default=None, help="comma-separated labels to run (e.g. 'justrl,stapo (rollout)')")
    ap.add_argument("--layouts", default="4,16", help="comma-separated M values (P = 16)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from stapo.demo.assets import build_base_model

    model = str(build_base_model(ROOT / "runs" / "_demo_base" / "seed0", seed=0, log=lambda *a: None))
    work = Path(tempfile.mkdtemp(prefix="stapo-bench-step-"))
    # a snapshot of this tree's src, so editing the tree while the benchmark runs cannot change what it times
    import shutil

    current_src = work / "current" / "src"
    shutil.copytree(ROOT / "src", current_src, ignore=shutil.ignore_patterns("__pycache__"))
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "src")
    base_src = None
    if args.baseline:
        base = work / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        base_src = str(base / "src")
    machine = machine_description()
    P = 16
    layouts = tuple(int(m) for m in args.layouts.split(","))
    todo = variants(P, args.baseline, layouts)
    if args.only:
        keep = {x.strip() for x in args.only.split(",")}
        todo = [v for v in todo if v["label"] in keep or v["label"].split(" @ ")[0] + " (before)" in keep]
    results: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for i, v in enumerate(todo):
            spec = {**v, "steps": args.steps, "model": model, "out": str(work / "runs"), "name": f"r{r}-v{i}",
                    "src": base_src if v.get("baseline") else str(current_src)}
            out = run_worker(str(HERE), spec, timeout=1800)
            if "error" in out:
                raise SystemExit(f"{v['label']} M={v['mini']}: {out['error']}")
            key = (v["mini"], v["label"])
            acc = results.setdefault(key, {k: [] for k in ("step_s", "update_s", "step_cpu_s", "update_cpu_s",
                                                           "response_length")})
            for k in acc:
                acc[k] += out[k]
            print(f"repeat {r} M={v['mini']:>2} {v['label']:<28} step {statistics.median(out['step_s']):.3f} s "
                  f"update {statistics.median(out['update_s']):.3f} s, CPU {statistics.median(out['step_cpu_s']):.3f} / "
                  f"{statistics.median(out['update_cpu_s']):.3f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    tables = []
    for mini in layouts:
        ref = {k: statistics.median(v) for k, v in results[(mini, "justrl")].items()}
        rows = []
        for (m, label), acc in results.items():
            if m != mini:
                continue
            med = {k: statistics.median(v) for k, v in acc.items()}
            rows.append([label] + [f"{med[k]:.3f} ({med[k] / ref[k]:.3f})"
                                   for k in ("step_cpu_s", "update_cpu_s", "step_s", "update_s")]
                        + [len(acc["step_s"])])
        tables.append(f"**M = {mini}** ({P // mini} optimizer step{'s' if P // mini > 1 else ''} a step); "
                      "seconds (ratio to justrl)\n\n"
                      + markdown_table(["objective (statistics)", "step CPU", "update CPU", "step wall",
                                        "update wall", "steps measured"], rows))
    cmd = "PYTHONPATH=src .venv/bin/python benchmarks/bench_update_step.py " + shlex.join(sys.argv[1:])
    text = (f"Command: `{cmd}` at commit {commit}{' (with uncommitted changes)' if dirty else ''}\n\n"
            f"Machine: {machine}. Runs one at a time, 1 torch thread each, "
            f"{args.repeats} interleaved repeats of {args.steps} steps (first step warm-up); this invocation "
            f"{wall / 60:.1f} min wall. The machine was shared with other jobs while this ran.\n\n"
            + "\n\n".join(tables) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    spec = worker_spec(sys.argv)
    if spec is not None:
        worker(spec)
    else:
        main()
