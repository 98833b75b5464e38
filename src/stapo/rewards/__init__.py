"""Verifiable rewards for math RL: math-verify equality that never hangs, DAPO's string verifier,
optional format and overlong terms, and users' verl / TRL reward functions by import path.

    with RewardPool("math", num_workers=2, timeout=2.0) as pool:
        pool.score_batch(["... so \\boxed{27}"], ["27.0"])   # -> [1.0]

Everything importable here is pure Python; SymPy runs only inside the pool's worker processes.
"""

from .correct import is_correct
from .dapo import dapo_equal, dapo_extract, dapo_reward, normalize_answer
from .extract import all_boxed, extract_answer, last_boxed, split_top_level
from .math_reward import answers_equal, math_reward
from .pool import RewardPool
from .registry import BUILTIN, resolve_reward
from .terms import OverlongConfig, format_term, overlong_penalty

__all__ = [
    "BUILTIN",
    "OverlongConfig",
    "RewardPool",
    "all_boxed",
    "answers_equal",
    "dapo_equal",
    "dapo_extract",
    "dapo_reward",
    "extract_answer",
    "format_term",
    "is_correct",
    "last_boxed",
    "math_reward",
    "normalize_answer",
    "overlong_penalty",
    "resolve_reward",
    "split_top_level",
]
