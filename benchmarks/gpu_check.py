"""The GPU check (issue 28): run through scripts/gpu_check.sh on the lent machine (BENCHMARKS.md, "GPU check").

    python3 benchmarks/gpu_check.py [--out DIR] [--cpu-smoke]

Four sections, each in fresh subprocesses (so one's allocator state never burdens another):
  token_stats  forward + backward of per-token log-prob + entropy, bf16, V = 151,936, H = 2,048,
               N = 8k and 16k: naive logits vs stapo.ops.token_stats (and TRL's fused head when trl is
               importable), through benchmarks/bench_token_stats.py: median time, peak memory
  train        3 `stapo train` steps each of stapo and justrl on a random-init model with Qwen3-0.6B's
               body and vocabulary and a tokenizer trained here on MATH500 text (no hub), bf16, HF
               generation, P = 8, G = 4, 256 new tokens (min = max, so both objectives see equal
               lengths): the trainer's own time/* metrics, peak memory, tokens/s, stapo / justrl
  eval         stapo.eval.evaluate on 8 MATH500 problems x 4 samples (bundled benchmark): tokens/s
  fsdp2        `torchrun --nproc-per-node 1 -m stapo train ... parallel.strategy=fsdp2`, 2 steps (NCCL, with
               NCCL_DEBUG=INFO: its log lines are counted)

Everything goes into DIR/gpu_check.json and DIR/gpu_check.md, with the machine, torch version and each
command; the subprocesses' output into DIR/gpu_check.log. Any error (a failed command, a missing row, the
time budget spent) makes the JSON's status "fail" and the exit status 1: a partial run never passes.
``--cpu-smoke`` runs the same code at tiny sizes on the CPU (gloo instead of NCCL, fp32) for
``make test``; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from _common import fmt_bytes, machine_description, markdown_table, read_metrics, worker_spec

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
RESULT = "GPU_CHECK_RESULT "  # prefix of a worker's result line

# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B): 28 layers, hidden 1024, 16 query / 8 kv heads of
# 128, MLP 3072, vocab 151936, tied embeddings. Random weights: only the shapes matter here.
QWEN3_0_6B = {
    "vocab_size": 151936, "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "max_position_embeddings": 40960,
}
GPU = {
    "device": "cuda", "dtype": "bfloat16", "model": QWEN3_0_6B, "tokenizer_vocab": 4096,
    "stats": {"vocab": 151936, "hidden": 2048, "n": [8192, 16384], "repeats": 5},
    "train": {"steps": 3, "P": 8, "G": 4, "new_tokens": 256, "micro_batch": 16},
    "eval": {"problems": 8, "new_tokens": 512},
    "fsdp2_steps": 2, "reward_workers": 2, "budget_s": 480,
}
SMOKE = {
    "device": "cpu", "dtype": "float32", "tokenizer_vocab": 400,
    "model": dict(QWEN3_0_6B, vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, intermediate_size=64),
    "stats": {"vocab": 512, "hidden": 32, "n": [64], "repeats": 1},
    "train": {"steps": 3, "P": 2, "G": 2, "new_tokens": 4, "micro_batch": 4},
    "eval": {"problems": 8, "new_tokens": 4},
    "fsdp2_steps": 2, "reward_workers": 1, "budget_s": 240,
}


class CheckFailed(RuntimeError):
    """A command failed or a result is missing: the check fails."""


# --- subprocesses ---------------------------------------------------------------------------


class Runner:
    """Runs the check's commands under one time budget; each command and its output are recorded."""

    def __init__(self, log: Path, budget_s: float):
        self.log, self.deadline, self.commands = log, time.monotonic() + budget_s, []
        self.last_output = ""

    def run(self, cmd: list[str], env: dict | None = None) -> str:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(f"time budget spent before: {shlex.join(cmd)}")
        self.commands.append(shlex.join(cmd))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT,
                                  env={**os.environ, **(env or {})}, check=False)
        except subprocess.TimeoutExpired as err:
            self._append(cmd, f"{err.stdout or ''}{err.stderr or ''}", "timeout", time.perf_counter() - t0)
            raise CheckFailed(f"time budget spent during: {shlex.join(cmd)}; see {self.log.name}") from None
        output = self.last_output = proc.stdout + proc.stderr
        self._append(cmd, output, proc.returncode, time.perf_counter() - t0)
        if proc.returncode != 0:
            tail = " | ".join(output.strip().splitlines()[-4:])
            raise CheckFailed(f"exit {proc.returncode}: {shlex.join(cmd)}: {tail}")
        return proc.stdout

    def worker(self, task: str, **spec) -> dict:
        out = self.run([sys.executable, str(HERE), "--worker", json.dumps({"task": task, **spec})])
        lines = [x for x in out.splitlines() if x.startswith(RESULT)]
        if not lines:
            raise CheckFailed(f"worker {task!r} printed no result")
        return json.loads(lines[-1][len(RESULT):])

    def _append(self, cmd, output, status, seconds):
        with self.log.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n{output}\n[exit {status}, {seconds:.1f} s]\n\n")


# --- workers (each runs in its own interpreter) -----------------------------------------------


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    from _common import peak_rss_bytes

    return peak_rss_bytes()


def build_model(spec: dict) -> dict:
    """A random-init Qwen3 with ``spec['model']``'s shape and a BPE trained on MATH500's text, saved
    (initialised on the CPU, in the check's own process: the measuring processes start clean)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as transformers_logging

    from stapo.data import load_benchmark
    from stapo.models.tiny import train_tokenizer

    problems = load_benchmark("math500")
    tok = train_tokenizer([p.prompt for p in problems] + [p.meta.get("solution", "") for p in problems],
                          vocab_size=spec["tokenizer_vocab"])
    config = Qwen3Config(**spec["model"], tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers_logging.disable_progress_bar()  # "Writing model shards"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(getattr(torch, spec["dtype"]))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    model.save_pretrained(spec["path"])
    tok.save_pretrained(spec["path"])
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokenizer_vocab": len(tok)}


class PeakMemory:
    """Peak memory of a block above what was allocated when it began (CUDA: allocated bytes; CPU: RSS)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        import gc

        import torch
        from _common import reset_peak_rss, rss_bytes

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc):
        import torch
        from _common import peak_rss_bytes

        self.bytes = (torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()) - self.base


def train_run(argv: list[str], run_dir: str, device: str) -> dict:
    """``stapo ARGV`` (a `stapo train`) in this process, so its peak memory is readable; the run's step rows."""
    from stapo.cli import main

    with PeakMemory(device) as peak:
        status = main(argv)
    if status != 0:
        raise CheckFailed(f"stapo {shlex.join(argv)} returned {status}")
    return {"peak_bytes": peak.bytes, "rows": [r for r in read_metrics(run_dir) if "time/step" in r]}


def eval_run(spec: dict) -> dict:
    """stapo.eval.evaluate of the saved model on the first problems of bundled MATH500, 4 samples each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.data import load_benchmark
    from stapo.eval import EvalSettings, evaluate

    with PeakMemory(spec["device"]) as peak:
        dtype = getattr(torch, spec["dtype"])
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(spec["device"]).eval()
        tok = AutoTokenizer.from_pretrained(spec["model"])
        problems = load_benchmark("math500")[: spec["problems"]]
        settings = EvalSettings(benchmarks=("math500",), max_new_tokens=spec["new_tokens"], batch_size=64,
                                reward_workers=spec["reward_workers"])
        t0 = time.perf_counter()
        results = evaluate(model, tok, {"math500": problems}, settings, spec["out"], model_name="random-qwen3",
                           progress=False)
        wall = time.perf_counter() - t0
    timing = json.loads((Path(spec["out"]) / "timing.json").read_text())
    return {"timing": timing, "wall_s": wall, "peak_bytes": peak.bytes,
            "avg": results["benchmarks"]["math500"]["avg"]}


def measure_worker(spec: dict) -> dict:
    """The training runs, one after the other, then the evaluation: one interpreter, peaks apart."""
    train = {name: train_run(run["argv"], run["run_dir"], spec["device"]) for name, run in spec["train"].items()}
    return {"train": train, "eval": eval_run(spec["eval"])}


WORKERS = {"measure": measure_worker}


# --- sections --------------------------------------------------------------------------------


def section_token_stats(run: Runner, sz: dict, work: Path) -> dict:
    import importlib.util

    # TRL's fused head, when trl is carried to the GPU machine (it is not by default: it needs datasets)
    trl = sz["device"] == "cuda" and importlib.util.find_spec("trl") is not None
    variants = ["naive", "stapo"] + (["trl-chunked"] if trl else [])
    raw = work / "token_stats.jsonl"
    s = sz["stats"]
    run.run([sys.executable, str(HERE.parent / "bench_token_stats.py"), "--device", sz["device"],
             "--dtype", "bfloat16" if sz["device"] == "cuda" else "float32", "--vocab", str(s["vocab"]),
             "--hidden", str(s["hidden"]), "--n", *map(str, s["n"]), "--repeats", str(s["repeats"]),
             "--variants", *variants, "--json", str(raw)])
    rows = [json.loads(x) for x in raw.read_text().splitlines()]
    for r in rows:
        if "error" in r:
            raise CheckFailed(f"token_stats {r['variant']} N={r['n']}: {r['error']}")
    got = {(r["variant"], r["n"]) for r in rows}
    missing = {(v, n) for v in variants for n in s["n"]} - got
    if missing:
        raise CheckFailed(f"token_stats: no result for {sorted(missing)}")
    keep = ("variant", "n", "vocab", "hidden", "dtype", "chunk_size", "median_s", "times_s", "peak_bytes")
    return {"rows": [{k: r[k] for k in keep} for r in rows]}


def _train_argv(sz: dict, model: Path, runs: Path, name: str, objective: str, steps: int) -> list[str]:
    t = sz["train"]
    cpu = sz["device"] == "cpu"
    return ["train", "--quiet", f"model.name_or_path={model}", f"model.dtype={sz['dtype']}",
            f"model.bf16_autocast={'off' if cpu else 'on'}", f"device={sz['device']}", f"objective.name={objective}",
            "data.train=math500", "data.heldout=null", "data.template=boxed", f"steps={steps}",
            f"rollout.prompts_per_step={t['P']}", f"rollout.n={t['G']}", f"rollout.max_new_tokens={t['new_tokens']}",
            f"rollout.min_new_tokens={t['new_tokens']}", f"rollout.generation_batch_size={t['P'] * t['G']}",
            f"optim.mini_batch_prompts={t['P']}", f"optim.micro_batch_size={t['micro_batch']}",
            "optim.warmup_steps=0", f"save_every={steps}", f"output_dir={runs}", f"run_name={name}"] \
        + [f"reward.num_workers={sz['reward_workers']}"] + (["threads=1"] if cpu else [])


def _step_summary(rows: list[dict]) -> dict:
    """The time split of each step, and medians over the steps after the first (the warm-up)."""
    keys = ("time/generate", "time/reward", "time/update", "time/step", "perf/tokens_per_s")
    later = rows[1:] or rows
    out = {k: statistics.median(r[k] for r in later) for k in keys}
    out["first_step_s"] = rows[0]["time/step"]
    out["per_step"] = [{k: r[k] for k in keys} for r in rows]
    if not all(math.isfinite(v) for v in out.values() if isinstance(v, float)):
        raise CheckFailed(f"non-finite step timing: {out}")
    return out


def section_train_eval(run: Runner, sz: dict, work: Path, model: Path) -> tuple[dict, dict]:
    """3 steps each of stapo and justrl, then the eval harness, in one measuring process."""
    steps, e = sz["train"]["steps"], sz["eval"]
    argvs = {o: _train_argv(sz, model, work / "runs", o, o, steps) for o in ("stapo", "justrl")}
    r = run.worker("measure", device=sz["device"],
                   train={o: {"argv": a, "run_dir": str(work / "runs" / o)} for o, a in argvs.items()},
                   eval={"model": str(model), "out": str(work / "eval"), "device": sz["device"],
                         "dtype": sz["dtype"], "reward_workers": sz["reward_workers"], **e})
    train = {}
    for objective, argv in argvs.items():
        got = r["train"][objective]
        if len(got["rows"]) != steps:
            raise CheckFailed(f"train {objective}: {len(got['rows'])} step rows in metrics.jsonl, expected {steps}")
        train[objective] = {"command": "stapo " + shlex.join(argv), "peak_bytes": got["peak_bytes"],
                            **_step_summary(got["rows"])}
    train["ratio_stapo_justrl"] = {k: train["stapo"][k] / train["justrl"][k] for k in ("time/step", "time/update")}
    expected = e["problems"] * 4  # the harness's N for MATH500 (the paper's)
    if r["eval"]["timing"]["samples"] != expected:
        raise CheckFailed(f"eval: {r['eval']['timing']['samples']} samples, expected {expected}")
    return train, r["eval"]


def section_fsdp2(run: Runner, sz: dict, work: Path, model: Path) -> dict:
    steps = sz["fsdp2_steps"]
    argv = _train_argv(sz, model, work / "runs", "fsdp2", "stapo", steps) + ["parallel.strategy=fsdp2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "stapo",
           *argv]
    cuda = sz["device"] == "cuda"
    run.run(cmd, env={"NCCL_DEBUG": "INFO"} if cuda else None)
    rows = [r for r in read_metrics(work / "runs" / "fsdp2") if "time/step" in r]
    if len(rows) != steps:
        raise CheckFailed(f"fsdp2: {len(rows)} step rows in metrics.jsonl, expected {steps}")
    # parallel.strategy=fsdp2 on CUDA joins an NCCL group (stapo.distributed.init_distributed); NCCL's own
    # log lines show it set up communicators (counted, not required: how lazily it does so is NCCL's)
    nccl_lines = sum("NCCL INFO" in x for x in run.last_output.splitlines())
    return {"backend": "nccl" if cuda else "gloo", "nccl_info_lines": nccl_lines, **_step_summary(rows)}


# --- report ----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['status'].upper()}", "", f"Machine: {report['machine']}", "",
             f"Mode: {report['mode']}; wall {report.get('wall_s', 0):.0f} s", ""]
    if report.get("error"):
        lines += ["Error:", "", "```", report["error"].strip(), "```", ""]
    s = report["sections"]
    if "token_stats" in s:
        rows = s["token_stats"]["rows"]
        naive = {r["n"]: r for r in rows if r["variant"] == "naive"}
        table = [[r["n"], r["variant"], f"{r['median_s'] * 1e3:.1f}", f"{r['median_s'] / naive[r['n']]['median_s']:.2f}",
                  fmt_bytes(r["peak_bytes"]), f"{r['peak_bytes'] / max(naive[r['n']]['peak_bytes'], 1):.3f}"]
                 for r in rows]
        first = rows[0]
        title = f"## Token statistics, forward + backward (V = {first['vocab']}, H = {first['hidden']}, {first['dtype']})"
        lines += [title, "",
                  markdown_table(["N", "variant", "median ms", "time / naive", "peak memory", "memory / naive"],
                                 table), ""]
    if "train" in s:
        t = s["train"]
        table = [[o, f"{t[o]['first_step_s']:.2f}", *(f"{t[o][k]:.2f}" for k in
                  ("time/generate", "time/reward", "time/update", "time/step")),
                  f"{t[o]['perf/tokens_per_s']:.0f}", fmt_bytes(t[o]["peak_bytes"])] for o in ("stapo", "justrl")]
        ratio = t["ratio_stapo_justrl"]
        lines += ["## Training steps (median of the steps after the first)", "",
                  markdown_table(["objective", "step 1 s", "generate s", "reward s", "update s", "step s",
                                  "tokens/s", "peak memory"], table), "",
                  f"stapo / justrl: step {ratio['time/step']:.3f}, update {ratio['time/update']:.3f}", "",
                  f"Command: `{t['stapo']['command']}` (and `objective.name=justrl run_name=justrl`)", ""]
    if "eval" in s:
        e = s["eval"]
        tm = e["timing"]
        text = (f"{tm['samples']} samples, {tm['tokens']} tokens, generate + verify {tm['seconds']:.1f} s: "
                f"{tm['tokens_per_s']:.0f} tokens/s; evaluate() wall {e['wall_s']:.1f} s; "
                f"peak memory {fmt_bytes(e['peak_bytes'])}; avg@4 {e['avg']:.3f} (random model)")
        lines += ["## Evaluation harness (MATH500, 4 samples a problem)", "", text, ""]
    if "fsdp2" in s:
        f = s["fsdp2"]
        text = (f"{len(f['per_step'])} steps; median step after the first {f['time/step']:.2f} s "
                f"(first {f['first_step_s']:.2f} s)")
        nccl = f", {f['nccl_info_lines']} `NCCL INFO` log lines" if f["backend"] == "nccl" else ""
        lines += [f"## torchrun, parallel.strategy=fsdp2 ({f['backend']}{nccl})", "", text, ""]
    lines += ["## Commands", ""] + [f"    {c}" for c in report["commands"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (for make test)")
    ap.add_argument("--budget-s", type=float, help="time budget in seconds (default: 480 on the GPU, 240 smoke)")
    args = ap.parse_args(argv)
    sz = dict(SMOKE if args.cpu_smoke else GPU, **({"budget_s": args.budget_s} if args.budget_s else {}))
    args.out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.out / "gpu_check.log", sz["budget_s"])
    run.log.write_text("")
    import torch

    report = {"status": "fail", "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "torch": torch.__version__,
              "python": sys.executable, "machine": machine_description(sz["device"]), "sizes": sz,
              "commands": run.commands, "sections": {}}
    t0 = time.perf_counter()
    try:
        if sz["device"] == "cuda" and not torch.cuda.is_available():
            raise CheckFailed("no CUDA device: run on the GPU machine, or pass --cpu-smoke")
        report["gpu"] = torch.cuda.get_device_name() if sz["device"] == "cuda" else None
        with tempfile.TemporaryDirectory(prefix="stapo-gpu-check-") as tmp:
            work = Path(tmp)
            model = work / "model"
            report["model"] = build_model({"path": str(model), "dtype": sz["dtype"], "model": sz["model"],
                                           "tokenizer_vocab": sz["tokenizer_vocab"]})
            report["sections"]["token_stats"] = section_token_stats(run, sz, work)
            s = report["sections"]
            s["train"], s["eval"] = section_train_eval(run, sz, work, model)
            s["fsdp2"] = section_fsdp2(run, sz, work, model)
        report["status"] = "pass"
    except Exception:  # noqa: BLE001 - any error fails the check, with its traceback in the report
        report["error"] = traceback.format_exc()
    report["wall_s"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: {report['status'].upper()} ({args.out / 'gpu_check.json'})")
    return 0 if report["status"] == "pass" else 1


if __name__ == "__main__":  # the reward pool spawns workers that re-import this file
    spec = worker_spec(sys.argv)
    if spec is None:
        raise SystemExit(main())
    sys.path.insert(0, str(ROOT / "src"))
    print(RESULT + json.dumps(WORKERS[spec.pop("task")](spec)), flush=True)
