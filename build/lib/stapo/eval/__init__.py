"""Evaluation harness: the paper's protocol (avg@N on six math benchmarks) plus pass@k and maj@k.

``evaluate`` runs one model (the trainer calls it in-loop on its policy), ``evaluate_checkpoints``
every checkpoint of a run; ``stapo eval`` is the command line over both.
"""

from .checkpoints import evaluate_checkpoints, evaluate_step, find_checkpoints, step_results, summarize_steps
from .harness import aggregate, evaluate, plan_chunks
from .metrics import benchmark_metrics, k_ladder, macro_average, majority_vote, mean_and_stderr, pass_at_k
from .report import detail_table, load_results, table1
from .settings import DECODING_PRESETS, DEFAULT_SAMPLES, PAPER_BENCHMARKS, EvalSettings

__all__ = [
    "DECODING_PRESETS",
    "DEFAULT_SAMPLES",
    "PAPER_BENCHMARKS",
    "EvalSettings",
    "aggregate",
    "benchmark_metrics",
    "detail_table",
    "evaluate",
    "evaluate_checkpoints",
    "evaluate_step",
    "find_checkpoints",
    "k_ladder",
    "load_results",
    "macro_average",
    "majority_vote",
    "mean_and_stderr",
    "pass_at_k",
    "plan_chunks",
    "step_results",
    "summarize_steps",
    "table1",
]
