"""Does S2T fire on a demo base? The spurious-token regime measured at the paper's settings.

    python -m stapo.demo.regime --task demo_words --seed 0 --prompts 256 --samples 8

Samples ``samples`` responses to each of ``prompts`` held-out problems at temperature T, scores
every sampled token under the same model (p, entropy H), rewards each response with the task's
exact reward and gives it its GRPO advantage. It then counts, as fractions of all response tokens:

- ``low_p``: p < τ_p; ``low_p_in_correct``: the same inside a correct response (where A > 0 is possible);
- ``candidates``: S2T candidates (A > 0 and p < τ_p);
- ``silenced``: candidates with H below τ_h, the q-quantile of the candidates' entropies, with τ_h
  taken over the whole sample (a paper-scale mini-batch: the paper's hold hundreds of candidates);
- ``silenced_per_minibatch``: τ_h taken per mini-batch of ``minibatch_prompts`` prompts, as the
  trainer does with ``optim.mini_batch_prompts``: a mini-batch with one candidate silences nothing
  (the q-quantile of one value is that value), so small mini-batches silence less.

Each silenced token is placed in the *wording* or in the *arithmetic* (a digit, or any token from
the first digit of the final ``\\boxed{`` on), and decoded examples show its context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from ..advantages import group_advantages
from ..batch import RolloutBatch
from ..objectives.masks import QUANTILE, TAU_P, s2t_candidates, s2t_silence
from ..rollout import HFGenerator, SamplingConfig, collate_rollouts
from ..trainer.phases import compute_old_logprobs
from .sft import encode_prompt
from .task import exact_reward


@dataclasses.dataclass
class RegimeReport:
    settings: dict  # τ_p, q, T, prompts, samples, minibatch_prompts, seed
    n_responses: int
    n_tokens: int  # response tokens (EOS included)
    accuracy: float  # share of correct responses
    low_p: float  # fractions of n_tokens from here on
    low_p_in_correct: float
    candidates: float
    silenced: float  # τ_h over the whole sample
    silenced_per_minibatch: float  # τ_h per mini-batch of `minibatch_prompts` prompts
    entropy_threshold: float  # τ_h over the whole sample (nan: no candidate)
    silenced_in_wording: int  # counts of silenced tokens (whole-sample τ_h)
    silenced_in_arithmetic: int
    candidates_in_wording: int
    candidates_in_arithmetic: int
    examples: list[dict]  # silenced tokens: piece, p, H, context, where

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def arithmetic_positions(tokenizer, response_ids: list[int]) -> list[bool]:
    """True where a token is a digit or belongs to the final answer (from ``\\boxed{`` on)."""
    pieces = [tokenizer.decode([t]) for t in response_ids]
    text, starts = "", []
    for piece in pieces:
        starts.append(len(text))
        text += piece
    box = text.rfind("\\boxed{")
    return [any(c.isdigit() for c in piece) or (box >= 0 and start + len(piece) > box)
            for piece, start in zip(pieces, starts)]


def _context(tokenizer, ids: list[int], pos: int, before: int = 10, after: int = 4) -> str:
    left = tokenizer.decode(ids[max(0, pos - before) : pos])
    right = tokenizer.decode(ids[pos + 1 : pos + 1 + after])
    return f"…{left}⟦{tokenizer.decode([ids[pos]])}⟧{right}…"


@torch.no_grad()
def sample_scored(
    model, tokenizer, problems: list, *, samples: int = 8, temperature: float = 1.0, max_new_tokens: int = 64,
    seed: int = 0, batch_size: int = 128,
) -> RolloutBatch:
    """``samples`` responses per problem as a ``RolloutBatch`` with rewards (exact match), GRPO
    advantages, and the sampling policy's log-probs and entropies (``old_logprobs``, ``old_entropy``)."""
    if samples < 2:
        raise ValueError(f"samples: need >= 2 responses per prompt for a group advantage, got {samples}")
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    sampling = SamplingConfig(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                              n=samples, seed=seed)
    generations = HFGenerator(model, tokenizer, batch_size=batch_size).generate(prompts, sampling)
    batch = collate_rollouts(problems, prompts, generations, tokenizer.pad_token_id)
    rewards = torch.tensor([exact_reward(t, p.answer) for t, p in zip(batch.response_texts, batch.problems)])
    batch = dataclasses.replace(batch, rewards=rewards, advantages=group_advantages(rewards, samples))  # [B]
    return batch.with_rollout_stats(compute_old_logprobs(model, batch, temperature, batch_size,
                                                         next(model.parameters()).device, with_collision=False))


def measure_regime(
    model,
    tokenizer,
    problems: list,
    *,
    samples: int = 8,
    temperature: float = 1.0,
    prob_threshold: float = TAU_P,
    entropy_quantile: float = QUANTILE,
    minibatch_prompts: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 128,
    n_examples: int = 12,
) -> RegimeReport:
    """Sample, score and count as the module docstring says; ``problems`` carry integer answers."""
    batch = sample_scored(model, tokenizer, problems, samples=samples, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    logprobs, entropy, mask = batch.old_logprobs, batch.old_entropy, batch.response_mask
    correct = (batch.rewards > 0).unsqueeze(1) & mask  # [B, T]
    low_p = (logprobs < math.log(prob_threshold)) & mask
    cand = s2t_candidates(logprobs, batch.advantages, mask, prob_threshold)
    silenced, tau = s2t_silence(cand, entropy, entropy_quantile)
    rows_per_minibatch = minibatch_prompts * samples
    per_mb = torch.cat([s2t_silence(c, e, entropy_quantile)[0]
                        for c, e in zip(cand.split(rows_per_minibatch), entropy.split(rows_per_minibatch))])

    n_tokens = int(mask.sum())
    where = {"silenced": [0, 0], "candidates": [0, 0]}  # [wording, arithmetic]
    examples = []
    for b in range(len(batch)):
        if not cand[b].any():
            continue
        ids = batch.response_ids[b, : int(batch.response_lengths[b])].tolist()
        arith = arithmetic_positions(tokenizer, ids)
        for t in cand[b].nonzero().flatten().tolist():
            where["candidates"][arith[t]] += 1
            if silenced[b, t]:
                where["silenced"][arith[t]] += 1
                if len(examples) < n_examples:
                    examples.append({"piece": tokenizer.decode([ids[t]]), "p": math.exp(float(logprobs[b, t])),
                                     "entropy": float(entropy[b, t]), "where": "arithmetic" if arith[t] else "wording",
                                     "context": _context(tokenizer, ids, t)})
    return RegimeReport(
        settings={"prob_threshold": prob_threshold, "entropy_quantile": entropy_quantile,
                  "temperature": temperature, "prompts": len(problems), "samples": samples,
                  "minibatch_prompts": minibatch_prompts, "seed": seed},
        n_responses=len(batch),
        n_tokens=n_tokens,
        accuracy=float(batch.rewards.mean()),
        low_p=int(low_p.sum()) / n_tokens,
        low_p_in_correct=int((low_p & correct).sum()) / n_tokens,
        candidates=int(cand.sum()) / n_tokens,
        silenced=int(silenced.sum()) / n_tokens,
        silenced_per_minibatch=int(per_mb.sum()) / n_tokens,
        entropy_threshold=float(tau),
        silenced_in_wording=where["silenced"][0],
        silenced_in_arithmetic=where["silenced"][1],
        candidates_in_wording=where["candidates"][0],
        candidates_in_arithmetic=where["candidates"][1],
        examples=examples,
    )


def main(argv: list[str] | None = None) -> int:
    from ..models.loading import load_causal_lm, load_tokenizer
    from .assets import build_base_model
    from .tasks import TASKS

    parser = argparse.ArgumentParser(prog="python -m stapo.demo.regime", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="demo_words")
    parser.add_argument("--model", help="a model directory (default: build or reuse the task's base for --seed)")
    parser.add_argument("--cache-dir", default="runs/_demo_base/seed0",
                        help="where the base is built/cached (make demo uses runs/_demo_base/seed<S>)")
    parser.add_argument("--seed", type=int, default=0, help="base model seed and sampling seed")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out problem set")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prob-threshold", type=float, default=TAU_P)
    parser.add_argument("--entropy-quantile", type=float, default=QUANTILE)
    parser.add_argument("--minibatch-prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model: {args.model} is not a model directory (no config.json)")
    if args.prompts < 1 or args.samples < 2:
        parser.error(f"--prompts must be >= 1 and --samples >= 2, got {args.prompts} and {args.samples}")
    if not 0 < args.prob_threshold < 1 or not 0 <= args.entropy_quantile <= 1 or args.temperature <= 0:
        parser.error("--prob-threshold must be in (0, 1), --entropy-quantile in [0, 1], --temperature > 0")

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    task = TASKS[args.task]
    path = args.model or build_base_model(args.cache_dir, task=args.task, seed=args.seed,
                                          log=lambda m: print(m, file=sys.stderr))
    model = load_causal_lm(str(path), key="--model").eval()
    tokenizer = load_tokenizer(str(path), key="--model")
    problems = task.make_problems(args.prompts, args.eval_seed, "heldout")
    report = measure_regime(model, tokenizer, problems, samples=args.samples, temperature=args.temperature,
                            prob_threshold=args.prob_threshold, entropy_quantile=args.entropy_quantile,
                            minibatch_prompts=args.minibatch_prompts, max_new_tokens=task.max_new_tokens,
                            seed=args.seed)
    print(report.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
