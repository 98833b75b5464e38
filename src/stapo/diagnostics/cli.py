"""``stapo analyze RUN_DIR``: the token-diagnostics report of a run (any objective).

    stapo analyze runs/demo                     # -> runs/demo/analysis/report.md + PNGs
    stapo analyze runs/demo --theory-check      # also check the theory on the run's saved model
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..cli import add_quiet_flag


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="token diagnostics report of a run (quadrants, gradient norms, entropy, silenced tokens)",
        description="Write RUN_DIR/analysis/report.md with PNGs from metrics.jsonl and rollouts/*.parquet.",
    )
    p.add_argument("run_dir", type=Path, help="run directory (metrics.jsonl, rollouts/step_*.parquet)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/analysis)")
    p.add_argument("--top", type=int, default=20, help="how many top silenced tokens to list")
    p.add_argument("--max-points", type=int, default=20000, help="scatter points per dump (silenced always kept)")
    p.add_argument("--theory-check", action="store_true",
                   help="also check the closed forms on the saved model's own samples (see docs/diagnostics.md)")
    p.add_argument("--model", type=Path, default=None,
                   help="HF model folder for --theory-check (default: the newest one saved under RUN_DIR)")
    p.add_argument("--theory-prompts", type=int, default=8, help="prompts taken from the last dump")
    p.add_argument("--theory-tokens", type=int, default=512, help="tokens checked at the logit level")
    p.add_argument("--theory-model-tokens", type=int, default=64, help="tokens given a whole-model step")
    p.add_argument("--seed", type=int, default=0)
    add_quiet_flag(p)
    p.set_defaults(func=run)
    return p


# what the user sets so that a run has dumps (the token plots and --theory-check read them)
NO_DUMPS = "set diagnostics.dump_every=N in the training config to dump rollouts every N steps"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
ADAPTER = "adapter_config.json"  # a LoRA run's checkpoints/step_*/policy (peft's save_pretrained)


def find_model_dir(run_dir: Path) -> Path:
    """The most recently written folder under ``run_dir`` holding a model: an HF ``config.json`` with
    weights, or a PEFT adapter (a LoRA run's checkpoint)."""
    found = [c.parent for c in run_dir.rglob("config.json") if any((c.parent / w).exists() for w in WEIGHTS)]
    found += [c.parent for c in run_dir.rglob(ADAPTER)
              if any((c.parent / w).exists() for w in ("adapter_model.safetensors", "adapter_model.bin"))]
    if not found:
        raise FileNotFoundError(f"--theory-check: no saved model (config.json + weights, or a LoRA adapter) "
                                f"under {run_dir}; pass --model DIR")
    return max(found, key=lambda d: d.stat().st_mtime)


def load_model(model_dir: Path):
    """(model, tokenizer) of a model folder; a LoRA adapter is loaded on its base and merged into it."""
    from ..models.loading import load_causal_lm, load_tokenizer

    if (model_dir / ADAPTER).exists():
        from peft import AutoPeftModelForCausalLM

        try:
            with warnings.catch_warnings():  # peft calls a transformers API it deprecated: not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir)).merge_and_unload()
        except OSError as err:
            base = json.loads((model_dir / ADAPTER).read_text()).get("base_model_name_or_path")
            raise FileNotFoundError(f"--theory-check: {model_dir} is a LoRA adapter whose base model {base!r} "
                                    f"cannot be loaded ({_first_line(err)})") from None
    else:
        model = load_causal_lm(str(model_dir), key="--model")
    # peft froze the base: the whole-model check differentiates every parameter of the merged model
    return model.requires_grad_(True).eval(), load_tokenizer(str(model_dir), key="--model")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _prompts_from_dumps(run_dir: Path, n: int) -> list[str]:
    from .dumps import list_dumps, read_rollouts

    dumps = list_dumps(run_dir)
    if not dumps:
        raise FileNotFoundError(f"--theory-check takes its prompts from the rollout dumps; {run_dir} has none "
                                f"({NO_DUMPS})")
    prompts = read_rollouts(dumps[-1][1]).column("prompt").to_pylist()
    unique = [p for p in dict.fromkeys(prompts) if p]
    if not unique:
        raise ValueError(f"{dumps[-1][1]}: the dump has no prompt text for --theory-check")
    return unique[:n]


def run(args) -> int:
    from ..progress import Reporter
    from .dumps import list_dumps
    from .report import write_report

    reporter = Reporter("analyze", quiet=args.quiet)  # phases on stderr; stdout names the report
    theory = None
    if args.theory_check:
        from .check import theory_check

        model_dir = args.model or find_model_dir(args.run_dir)
        prompts = _prompts_from_dumps(args.run_dir, args.theory_prompts)  # before the model loads
        reporter.hush_library_bars()
        reporter.phase(f"loading {model_dir}")
        model, tokenizer = load_model(model_dir)
        theory = theory_check(model, tokenizer, prompts, n_tokens=args.theory_tokens,
                              n_model_tokens=args.theory_model_tokens, seed=args.seed, progress=reporter)
        theory["markdown"] = f"Model: `{model_dir}`.\n\n" + theory["markdown"]
    path = write_report(args.run_dir, args.out, theory=theory, top_k=args.top, max_points=args.max_points,
                        seed=args.seed, say=reporter.phase)
    if args.run_dir.is_dir() and not list_dumps(args.run_dir):  # said even with --quiet: the report is thin
        print(f"stapo analyze: note: {args.run_dir} has no rollout dumps, so the token plots are empty; "
              f"{NO_DUMPS}", file=sys.stderr)
    print(f"wrote {path}")
    return 0
