"""Accuracy of a policy on demo problems through any rollout ``Generator`` (HF, vLLM)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..data.problem import Problem
from ..rollout.base import Generator, SamplingConfig
from .sft import encode_prompt
from .task import exact_reward


@dataclasses.dataclass(frozen=True)
class DemoEval:
    accuracy: float  # mean exact_reward over all samples
    stop_rate: float  # share of samples that ended with EOS (the rest hit max_new_tokens)
    mean_length: float  # response tokens per sample, EOS included
    n: int  # samples scored (problems x sampling.n)


def evaluate(
    generator: Generator, tokenizer, problems: Sequence[Problem], sampling: SamplingConfig
) -> DemoEval:
    """Sample ``sampling.n`` answers per problem and score each with ``exact_reward``.

    ``sampling.temperature == 0`` means greedy decoding (``HFGenerator`` convention).
    """
    if not problems:
        raise ValueError("problems: empty evaluation set")
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    gens = generator.generate(prompts, sampling)
    scored = [(exact_reward(g.text, p.answer), g) for p, gs in zip(problems, gens) for g in gs]
    n = len(scored)
    return DemoEval(
        accuracy=sum(r for r, _ in scored) / n,
        stop_rate=sum(g.finish_reason == "stop" for _, g in scored) / n,
        mean_length=sum(len(g.response_ids) for _, g in scored) / n,
        n=n,
    )
