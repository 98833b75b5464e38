"""Benchmark 3 (issue 11): one whole RL step of stapo's trainer versus TRL's GRPOTrainer.

Identical work on both sides: the same tiny Qwen3 and tokenizer (saved once, loaded by both),
the same P prompts a step in the same order (no shuffling, chat template on both sides; the
token ids are checked equal before timing), G samples each, fixed response length
(min_new_tokens = max_new_tokens = T, so no EOS ends a row early), the same cheap deterministic
reward function (TRL's signature; stapo runs it in its reward pool, TRL in-process), one
optimizer step per RL step (mini-batch = the whole batch of B = P·G rows) accumulated over
micro-batches of the same size, torch AdamW (``optim="adamw_torch"`` on TRL, not the fused
default) at the same constant lr, grad clip 1.0, fp32, dropout off, the same torch threads and
denormal flushing in both processes.

Pairs (loss settings matched: clip 0.2 / 0.28, dual clip 10, token mean, no KL):
  stapo:justrl  stapo's trainer, objective=justrl      vs  trl:grpo  GRPOTrainer(loss_type="dapo", delta=10)
  stapo:stapo   stapo's trainer, objective=stapo (S2T) vs  trl:stapo stapo.integrations.trl.STAPOTrainer

Timing: each variant runs in a fresh interpreter for ``warmup + steps`` RL steps. A step is the
wall time between consecutive end-of-step hooks (stapo: its RunLogger.log call; TRL: a
TrainerCallback's on_step_end), so it includes everything the trainer does in a step (logging,
metric reduction, ...). Split: generation (stapo's ``time/generate``: render, tokenise, generate,
collate; TRL: ``_generate``: tokenise, generate), scoring (stapo's ``time/reward``; TRL:
``_calculate_rewards``), update = step − generation − scoring (log-prob passes, loss, backward,
optimizer, bookkeeping). Medians over the measured steps of all rounds (runs interleaved), the
best step, and process CPU time per step. Memory: the peak RSS of the measured
steps (VmHWM, reset when warm-up ends, read at the end of the last measured step), absolute and
above the RSS at the start of the measured steps (stapo's reward workers are separate processes
and not counted; with the cheap reward they hold little).

Run (the recorded results, RESULTS_train_step.md):
  .venv/bin/python benchmarks/bench_train_step_vs_trl.py --rounds 5 --steps 6
  .venv/bin/python benchmarks/bench_train_step_vs_trl.py --rounds 2 --steps 5 --reward math
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt_bytes, machine_description, markdown_table, run_worker, worker_spec

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
PAIRS = (("stapo:justrl", "trl:grpo"), ("stapo:stapo", "trl:stapo"))


# --- the shared reward (TRL's signature; stapo's pool imports it by "module:function") ---------


def first_digit_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion contains the gold's first digit: cheap, deterministic, and a random
    tiny model hits it often enough that groups get mixed rewards (non-zero advantages)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if str(a)[0] in t else 0.0 for t, a in zip(texts, answer)]


def math_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL side of ``--reward math``: stapo's math scorer (math-verify) called in-process, as a TRL
    user would; stapo's side uses its ``math`` reward pool (worker processes, per-item time limits)."""
    from stapo.rewards.math_reward import math_reward as score

    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(score(t, a)) for t, a in zip(texts, answer)]


# --- workers ----------------------------------------------------------------------------------


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class StepClock:
    """End-of-step timestamps; resets the RSS high-water mark once warm-up is over."""

    def __init__(self, warmup: int):
        self.warmup, self.ends, self.cpu, self.splits = warmup, [], [], []
        self.base_rss = self.peak_rss = None

    def step_end(self, gen: float, score: float) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.splits.append((gen, score))
        if len(self.ends) == self.warmup:  # measured steps start now
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base_rss = _proc_kib("VmRSS") * 1024
        elif len(self.ends) > self.warmup:  # read here: what runs after the last step does not count
            self.peak_rss = _proc_kib("VmHWM") * 1024

    def result(self) -> dict:
        steps = []
        for i in range(self.warmup, len(self.ends)):
            total = self.ends[i] - self.ends[i - 1]
            gen, score = self.splits[i]
            steps.append({"step": total, "generate": gen, "score": score, "update": total - gen - score,
                          "cpu": self.cpu[i] - self.cpu[i - 1]})
        return {"steps": steps, "peak_above_base": self.peak_rss - self.base_rss,
                "peak_rss": self.peak_rss, "load_avg": os.getloadavg()[0]}


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # stapo's trainer does this (setup.set_cpu_threads); same for TRL


def _stapo_worker(spec: dict) -> dict:
    from stapo.config import build_config
    from stapo.trainer import loop

    clock = StepClock(spec["warmup"])

    class TimedLogger(loop.RunLogger):
        def log(self, step, metrics):
            if step > 0:  # step 0 is the (empty) pre-training evaluation
                clock.step_end(metrics["time/generate"], metrics["time/reward"])
            return super().log(step, metrics)

    loop.RunLogger = TimedLogger
    reward = f"{HERE.stem}:{'math_reward' if spec['reward'] == 'math' else 'first_digit_reward'}"
    P, G = spec["prompts"], spec["n"]
    cfg = build_config(None, [
        f"model.name_or_path={spec['model_dir']}", f"output_dir={spec['tmp']}", f"run_name={spec['variant']}",
        f"data.train={spec['data']}", "data.heldout=null", "data.template=none", "data.use_chat_template=auto",
        "data.shuffle=false", f"rollout.prompts_per_step={P}", f"rollout.n={G}",
        f"rollout.max_new_tokens={spec['tokens']}", f"rollout.min_new_tokens={spec['tokens']}",
        f"rollout.generation_batch_size={P * G}", f"optim.mini_batch_prompts={P}",
        f"optim.micro_batch_size={spec['micro']}", f"optim.lr={spec['lr']}", "optim.warmup_steps=0",
        f"objective.name={spec['objective']}", "objective.options={}",
        "reward.name=" + ("math" if spec["reward"] == "math" else reward), "reward.num_workers=1",
        f"steps={spec['warmup'] + spec['steps']}", "save_every=100000", "eval_every=0",
        f"threads={spec['threads']}", "model.dtype=float32", "seed=0",
        *spec.get("stapo_overrides", []),
    ])
    loop.train(cfg, quiet=True)
    return clock.result()


def _trl_worker(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from stapo.integrations.trl import STAPOConfig, STAPOTrainer

    _set_threads(spec["threads"])
    clock = StepClock(spec["warmup"])
    acc = {"gen": 0.0, "score": 0.0}

    s2t = spec["variant"] == "trl:stapo"
    base = STAPOTrainer if s2t else __import__("trl").GRPOTrainer

    class Timed(base):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                acc["gen"] += time.perf_counter() - t0

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._calculate_rewards(*args, **kwargs)
            finally:
                acc["score"] += time.perf_counter() - t0

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end(acc["gen"], acc["score"])
            acc["gen"] = acc["score"] = 0.0

    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["problem"]}] for r in rows],
                                 "answer": [r["answer"] for r in rows]})
    P, G, micro = spec["prompts"], spec["n"], spec["micro"]
    options = {
        "output_dir": spec["tmp"], "per_device_train_batch_size": micro, "gradient_accumulation_steps": P * G // micro,
        "num_generations": G, "max_completion_length": spec["tokens"],
        "generation_kwargs": {"min_new_tokens": spec["tokens"]}, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "learning_rate": spec["lr"], "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "optim": "adamw_torch", "max_grad_norm": 1.0, "max_steps": spec["warmup"] + spec["steps"], "logging_steps": 1,
        "save_strategy": "no", "report_to": [], "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
        "loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "delta": 10.0, "beta": 0.0, "disable_dropout": True,
        "shuffle_dataset": False, "seed": 0, "dataloader_num_workers": 0, "log_completions": False,
    }
    config = STAPOConfig(**options) if s2t else __import__("trl").GRPOConfig(**options)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype="float32")
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    reward = math_reward if spec["reward"] == "math" else first_digit_reward
    trainer = Timed(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tok,
                    callbacks=[Clock()])
    trainer.train()
    return clock.result()


def worker(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    if spec["variant"].startswith("stapo:"):
        spec = {**spec, "objective": spec["variant"].split(":")[1]}
        out = _stapo_worker(spec)
    else:
        out = _trl_worker(spec)
    return {**spec, **out}


# --- parent: inputs, runs, report ---------------------------------------------------------------


def make_inputs(tmp: Path, n_problems: int, seed: int = 0) -> tuple[Path, Path]:
    """A tiny Qwen3 + tokenizer saved like a user checkpoint, and the problems as JSON lines."""
    from stapo.demo.task import make_problems
    from stapo.models.tiny import tiny_model_and_tokenizer

    problems = make_problems(max(n_problems, 400), seed=seed)
    model, tok = tiny_model_and_tokenizer([p.prompt for p in problems] + [p.meta["solution"] for p in problems],
                                          seed=seed)
    model_dir = tmp / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": p.prompt, "answer": p.answer}) + "\n"
                            for p in problems[:n_problems]))
    return model_dir, data


def check_same_prompt_ids(model_dir: Path, data: Path, k: int) -> int:
    """stapo renders a prompt string and tokenises it; TRL applies the chat template to the message.
    Both must give the same ids, or the two sides would not do the same work. Returns the mean length."""
    from transformers import AutoTokenizer

    from stapo.data import build_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in data.read_text().splitlines()[:k]]
    lengths = []
    for r in rows:
        ours = tok(build_prompt(r["problem"], tok, template="none", use_chat_template=True),
                   add_special_tokens=False)["input_ids"]
        theirs = tok.apply_chat_template([{"role": "user", "content": r["problem"]}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        if list(ours) != list(theirs):
            raise SystemExit(f"prompt ids differ for {r['problem']!r}: {ours} vs {theirs}")
        lengths.append(len(ours))
    return round(statistics.mean(lengths))


KEYS = ("step", "best", "cpu", "generate", "score", "update")


def pooled(runs: list[dict]) -> dict:
    """One variant's rounds -> medians over all their measured steps, and the worst-case memory."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    steps = [s for r in ok for s in r["steps"]]
    median = {k: statistics.median(s[k] for s in steps) for k in KEYS if k != "best"}
    return {"median": {**median, "best": min(s["step"] for s in steps)},
            "round_medians": [statistics.median(s["step"] for s in r["steps"]) for r in ok],
            "peak_above_base": max(r["peak_above_base"] for r in ok), "peak_rss": max(r["peak_rss"] for r in ok),
            "load_avg": statistics.mean(r["load_avg"] for r in ok), "n_steps": len(steps)}


def report(by: dict[str, dict], args, command: str, prompt_len: int) -> str:
    header = ["variant", "step (s)", "best step (s)", "step CPU (s)", "generate (s)", "score (s)", "update (s)",
              "round medians (s)", "peak RSS above base", "peak RSS", "load"]
    rows = []
    for name, r in by.items():
        if "error" in r:
            rows.append([f"`{name}`", r["error"]] + [""] * (len(header) - 2))
            continue
        m = r["median"]
        rows.append([f"`{name}`", *(f"{m[k]:.3f}" for k in KEYS), " / ".join(f"{x:.2f}" for x in r["round_medians"]),
                     fmt_bytes(r["peak_above_base"]), fmt_bytes(r["peak_rss"]), f"{r['load_avg']:.1f}"])
    ratio_rows = []
    for ours, theirs in PAIRS:
        if "error" not in by.get(ours, {"error": 1}) and "error" not in by.get(theirs, {"error": 1}):
            a, b = by[ours]["median"], by[theirs]["median"]
            ratio_rows.append([f"`{theirs}` / `{ours}`"] + [f"{b[k] / a[k]:.2f}×" for k in KEYS])
    B = args.prompts * args.n
    setup = (
        f"Work per step: P = {args.prompts} prompts × G = {args.n} = {B} rows, prompts ≈ {prompt_len} tokens, "
        f"T = {args.tokens} response tokens (min = max), micro-batch {args.micro} ({B // args.micro} accumulation "
        f"steps, one optimizer step), reward `{args.reward}`, {args.threads} torch thread(s). {args.rounds} "
        f"round(s), variants interleaved, each run a fresh process with {args.warmup} warm-up and {args.steps} "
        "measured steps; medians over all measured steps of all rounds. Best step = the fastest measured step "
        "(the least disturbed by other jobs). Step CPU = the trainer process's CPU time per step (less "
        "sensitive to other jobs than wall time; stapo's reward worker process not included)."
    )
    return "\n".join([
        setup,
        "",
        markdown_table(header, rows),
        "",
        "Speed-up of stapo (TRL time / stapo time; > 1 = stapo faster):",
        "",
        markdown_table(["pair", *KEYS], ratio_rows),
        "",
        f"Command: `{command}`",
    ])


def main(argv=None) -> int:
    spec = worker_spec(sys.argv)
    if spec is not None:
        print(json.dumps(worker(spec)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="P prompts per step")
    ap.add_argument("--n", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--tokens", type=int, default=32, help="T response tokens (min = max)")
    ap.add_argument("--micro", type=int, default=16, help="rows per forward/backward micro-batch")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--reward", choices=("digit", "math"), default="digit")
    ap.add_argument("--variants", nargs="+", default=[v for pair in PAIRS for v in pair])
    ap.add_argument("--stapo-overrides", nargs="*", default=[], help="extra a.b=v overrides for stapo's config")
    ap.add_argument("--out", type=Path, help="write the markdown here as well")
    args = ap.parse_args(argv)
    if min(args.steps, args.warmup, args.rounds) < 1:
        ap.error("--steps, --warmup and --rounds must be >= 1")
    if (args.prompts * args.n) % args.micro:
        ap.error("--micro must divide prompts × n")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/" + HERE.name, *sys.argv[1:]])
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="stapo-bench-step-") as tmp:
        tmp = Path(tmp)
        model_dir, data = make_inputs(tmp, args.prompts * (args.steps + args.warmup))
        prompt_len = check_same_prompt_ids(model_dir, data, args.prompts * (args.steps + args.warmup))
        machine = machine_description()
        for rnd in range(args.rounds):
            for variant in args.variants:
                spec = {"variant": variant, "model_dir": str(model_dir), "data": str(data),
                        "tmp": str(tmp / f"{variant}-{rnd}"), "prompts": args.prompts, "n": args.n,
                        "tokens": args.tokens, "micro": args.micro, "steps": args.steps, "warmup": args.warmup,
                        "threads": args.threads, "lr": args.lr, "reward": args.reward,
                        "stapo_overrides": args.stapo_overrides}
                t0 = time.perf_counter()
                out = run_worker(str(HERE), spec, timeout=1800)
                step = out.get("error") or f"{statistics.median(s['step'] for s in out['steps']):.3f} s/step"
                print(f"round {rnd} {variant}: {time.perf_counter() - t0:.0f} s, {step}", file=sys.stderr)
                runs[variant].append(out)
    text = report({v: pooled(r) for v, r in runs.items()}, args, command, prompt_len) + f"\n\nMachine: {machine}\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # reward workers import this file as a module
    raise SystemExit(main())
