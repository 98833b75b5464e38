"""Held-out accuracy during training (the demo's before/after numbers and `eval_every`)."""

from __future__ import annotations

import torch

from ..data.prompts import tokenize_prompt
from ..rewards.correct import is_correct
from ..rollout import SamplingConfig


def heldout_accuracy(generator, tokenizer, pool, problems: list, prompts: list[str], rollout_cfg, *,
                     samples: int, seed: int) -> dict[str, float]:
    """Sampled accuracy (avg over ``samples`` at the rollout temperature) and greedy accuracy.

    Uses its own RNG stream (``seed``), so evaluating never changes the training trajectory.
    Correct is ``rewards.is_correct`` of the verifier's unshaped score (no format or overlong terms:
    an answer that is right but inside the overlong buffer counts as right, as in ``stapo eval``).
    """
    ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    golds = [p.answer for p in problems]
    out = {}
    for label, temperature, n in [("eval/accuracy", rollout_cfg.temperature, samples), ("eval/greedy_accuracy", 0.0, 1)]:
        sampling = SamplingConfig(temperature=temperature, top_p=rollout_cfg.top_p, top_k=0,
                                  max_new_tokens=rollout_cfg.max_new_tokens, n=n, seed=seed)
        gens = generator.generate(ids, sampling)
        texts = [g.text for group in gens for g in group]
        lengths = [len(g.response_ids) for group in gens for g in group]
        scores = pool.score_batch(texts, [g for g in golds for _ in range(n)], shaped=False)
        correct = [is_correct(s) for s in scores]
        out[label] = float(torch.tensor(correct, dtype=torch.float32).mean())
        if label == "eval/accuracy":
            out["eval/response_length"] = sum(lengths) / max(1, len(lengths))
    pool.pop_metrics()  # eval timeouts are not training metrics
    return out
