"""``stapo eval``: evaluate a model, a training run's checkpoints, or compare finished evals.

stapo eval --model PATH_OR_ID [--benchmarks aime24,...] [--out DIR]   # one model
stapo eval --run RUN_DIR [--every K]                                  # every checkpoint of a run
stapo eval --compare DIR_A DIR_B ...                                  # side-by-side Table 1
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from ..cli import add_quiet_flag
from ..config.dtypes import SPELLINGS, dtype_argument
from ..errors import UserError
from .settings import DECODING_PRESETS, PAPER_BENCHMARKS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate on the math benchmarks (avg@N, pass@k, maj@k)",
        description="Sample N responses per problem, verify them with the math reward, and report avg@N "
        "(the paper's metric), pass@k, maj@k and the standard error per benchmark and their macro average.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="hub id or save_pretrained directory to evaluate")
    what.add_argument("--run", help="training run directory: evaluate its checkpoints/step_*/policy")
    what.add_argument("--compare", nargs="+", metavar="DIR", help="eval output dirs or run dirs to tabulate")
    p.add_argument(
        "--benchmarks",
        default=",".join(PAPER_BENCHMARKS),
        help="comma-separated benchmark names (default: all six)",
    )
    p.add_argument(
        "--samples",
        default="",
        help="N overrides, e.g. aime24=16,math500=8 "
        "(defaults: 32 for aime24/aime25/amc23, 4 for math500/minerva/olympiadbench)",
    )
    p.add_argument(
        "--decoding",
        default="justrl",
        choices=list(DECODING_PRESETS),
        help="justrl (default) = temperature 0.7 / top-p 0.9; train = 1.0 / 1.0",
    )
    p.add_argument("--temperature", type=float, default=None, help="override the preset's temperature")
    p.add_argument("--top-p", type=float, default=None, help="override the preset's top-p")
    p.add_argument("--max-new-tokens", type=int, default=8192, help="response length cap (default: 8192)")
    p.add_argument(
        "--template",
        default="boxed",
        help="prompt template: boxed (default), dapo, none, or a string with {question}",
    )
    p.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "on", "off"],
        help="apply the tokenizer's chat template (default: auto = when it has one)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="first K problems of each benchmark (quick checks)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="(problem x sample) rows per generate call (default: 64)"
    )
    p.add_argument(
        "--backend",
        default="hf",
        help="generation backend, one of the registered rollout backends (default: hf); "
        "vllm needs `pip install 'stapo[vllm]'`",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        type=dtype_argument,
        help=f"weights dtype: {SPELLINGS} (default: auto = bf16 on a GPU that has it, else fp32)",
    )
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--reward-workers", type=int, default=2, help="verifier processes (default: 2)")
    p.add_argument("--strict", action="store_true", help="only a \\boxed{} answer counts")
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory whose benchmarks/ replaces the bundled sets (default: $STAPO_DATA_DIR, else bundled)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: eval_runs/<model name>; with --run: RUN/eval/step_*)",
    )
    p.add_argument("--every", type=int, default=None, help="with --run: only steps divisible by K")
    add_quiet_flag(p)
    p.set_defaults(func=run)
    return p


def settings_from_args(args):
    from .settings import EvalSettings, parse_samples

    return EvalSettings(
        benchmarks=tuple(b.strip() for b in args.benchmarks.split(",") if b.strip()),
        samples=parse_samples(args.samples),
        decoding=args.decoding,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        chat_template=args.chat_template,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        backend=args.backend,
        reward_workers=args.reward_workers,
        strict=args.strict,
    )


def load_problems(benchmarks, data_dir: str | None, limit: int | None = None) -> dict[str, list]:
    """{benchmark: problems} via ``stapo.data.load_benchmark``; unknown names fail with the known ones."""
    from ..data import BENCHMARKS, load_benchmark

    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"--benchmarks: unknown {unknown}; choose from {sorted(BENCHMARKS)}")
    return {b: load_benchmark(b, data_dir=data_dir)[:limit] for b in benchmarks}


def write_report(results: dict, out_dir: str | Path, label: str) -> str:
    """Bar charts and results.md beside results.json; returns the Markdown printed to the terminal."""
    from .plots import plot_benchmarks
    from .report import detail_table, table1

    plot_benchmarks(results, out_dir)
    text = table1([(label, results)]) + "\n\n" + detail_table(results)
    (Path(out_dir) / "results.md").write_text(text + "\n")
    return text


def _label(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def _default_out(model: str) -> Path:
    return Path("eval_runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/"))


def run(args) -> int:
    """Bad input (unknown benchmark, missing file, settings that clash with stored samples) is
    reported in one line on stderr with exit code 2, not a traceback."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from err  # `stapo eval: error: ...`, exit 2 (stapo.cli.main)


def _run(args) -> int:
    from .report import load_results, table1

    if args.compare:
        print(table1([load_results(d) for d in args.compare]))
        return 0
    settings = settings_from_args(args)
    from ..rollout.backends import missing_requirement

    if (hint := missing_requirement(settings.backend)) is not None:
        raise UserError(f"--backend {settings.backend}: {hint}")  # before loading anything
    problems = load_problems(settings.benchmarks, args.data_dir, settings.limit)
    progress = not args.quiet
    if args.run:
        from .checkpoints import evaluate_checkpoints, summarize_steps

        evaluate_checkpoints(
            args.run,
            settings,
            problems,
            every=args.every,
            dtype=args.dtype,
            device=args.device,
            progress=progress,
        )
        print(summarize_steps(Path(args.run) / "eval"))
        print(f"\nper-step results under {Path(args.run) / 'eval'}; plot: accuracy_vs_step.png")
        return 0

    from ..models.hub import resolve_model_source
    from ..models.loading import check_model_folder
    from .harness import CONFIG, check_config, config_record, evaluate, out_lock
    from .loading import check_not_run_dir, dtype_name, load_for_eval

    check_not_run_dir(args.model)
    source = resolve_model_source(args.model, "--model")  # offline: the cached copy, or one line within seconds
    check_model_folder(source, "--model")  # config.json and whole weights, before anything loads
    out = Path(args.out) if args.out else _default_out(args.model)
    dtype = dtype_name(args.dtype, args.device, settings.backend)
    # refused before the model loads: a folder another eval writes, or one of other settings
    check_config(out / CONFIG, config_record(args.model, dtype, settings, list(problems)))
    from ..progress import Reporter

    reporter = Reporter("eval", quiet=args.quiet)
    reporter.hush_library_bars()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        try:
            reporter.phase(f"loading {args.model} ({dtype}, {settings.backend})")
            model, tok, generator = load_for_eval(source, settings, args.dtype, args.device)
        except (ValueError, UserError):
            if created:  # a model that does not load leaves no output folder behind
                shutil.rmtree(out, ignore_errors=True)
            raise
        results = evaluate(model, tok, problems, settings, out, generator=generator, model_name=args.model,
                           dtype=dtype, progress=progress)
    print(write_report(results, out, _label(args.model)))
    print(f"outputs in {out}: results.json, results.md, samples.jsonl, plot_<benchmark>.png")
    return 0
