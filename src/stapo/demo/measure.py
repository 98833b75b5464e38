"""Build demo base models and measure their held-out accuracy (numbers in docs/demo_notes.md).

    python -m stapo.demo.measure --cache-dir /tmp/stapo-demo --seeds 0 1 2 --n-eval 256 \\
        --set sft_steps=300 sft_lr=1e-3
    python -m stapo.demo.measure --task demo_words --seeds 0

Prints one JSON line per seed: SFT wall/CPU seconds, steps taken, SFT loss, validation
checks, held-out sampled (temperature 1, ``--samples`` per problem) and greedy accuracy,
and the evaluation's own wall/CPU seconds. CPU seconds are process time over all threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from ..models.loading import load_causal_lm, load_tokenizer
from ..rollout import HFGenerator, SamplingConfig
from .assets import INFO_FILE, BaseModelSettings, build_base_model
from .evaluate import evaluate
from .tasks import TASKS


def _parse_overrides(pairs: list[str]) -> dict:
    types = {f.name: f.type for f in dataclasses.fields(BaseModelSettings)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set: expected FIELD=VALUE with FIELD in {sorted(types)}, got {pair!r}")
        if value == "None":
            out[key] = None
        else:
            out[key] = float(value) if "float" in str(types[key]) else int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stapo.demo.measure", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="/tmp/stapo-demo")
    parser.add_argument("--task", choices=sorted(TASKS), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n-eval", type=int, default=256)
    parser.add_argument(
        "--eval-seed", type=int, default=0, help="seed of the held-out problem set (same for all models)"
    )
    parser.add_argument("--samples", type=int, default=4, help="samples per problem for sampled accuracy")
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="BaseModelSettings overrides"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal weights after training slowed CPU generation in the prototype
    overrides = _parse_overrides(args.set)
    task = TASKS[args.task]
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    heldout = task.make_problems(args.n_eval, args.eval_seed, "heldout")
    for seed in args.seeds:
        path = build_base_model(
            args.cache_dir, task=args.task, seed=seed, log=lambda m: print(m, file=sys.stderr), **overrides
        )
        info = json.loads((path / INFO_FILE).read_text())
        model = load_causal_lm(str(path))
        tokenizer = load_tokenizer(str(path))
        gen = HFGenerator(model, tokenizer, batch_size=128)
        t0, c0 = time.perf_counter(), time.process_time()
        sampled = evaluate(
            gen,
            tokenizer,
            heldout,
            SamplingConfig(1.0, 1.0, 0, max_new_tokens, n=args.samples, seed=seed),
        )
        greedy = evaluate(gen, tokenizer, heldout, SamplingConfig(0.0, 1.0, 0, max_new_tokens))
        row = {
            "seed": seed,
            "settings": overrides,
            "sft_wall_s": round(info["sft"]["wall_s"], 1),
            "sft_cpu_s": round(info["sft"]["cpu_s"], 1),
            "sft_steps_taken": info["sft"]["steps_taken"],
            "sft_loss": [round(info["sft"]["first_loss"], 3), round(info["sft"]["last_loss"], 3)],
            "valid_checks": [(s, round(a, 3)) for s, a in info["sft"]["valid_checks"]],
            "sampled_acc": sampled.accuracy,
            "greedy_acc": greedy.accuracy,
            "sampled_stop_rate": sampled.stop_rate,
            "eval_wall_s": round(time.perf_counter() - t0, 1),
            "eval_cpu_s": round(time.process_time() - c0, 1),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
