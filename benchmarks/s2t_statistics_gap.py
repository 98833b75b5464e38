"""How far the S2T mask from the rollout policy's statistics is from the paper's (current policy's).

Runs the demo recipe (configs/demo.yaml: P = 16, G = 8, M = 4, lr 5e-5, the warm-started demo model)
with `stapo` and the paper's `objective.statistics: current` for ``--steps`` RL steps. On every
mini-batch after the first of a step (where the two differ; on the first they are the same by
construction) it plans the mini-batch twice, from the current policy's no-grad pass and from the
rollout policy's statistics (``old_logprobs``, ``old_entropy``), compares the two keep masks, then
trains on the current one exactly as ``update_policy`` does.

Reported, summed over those mini-batches: valid tokens, tokens silenced by each mask, tokens whose
keep/silence status differs (and that count over the union of silenced tokens), and the mean
|Δτ_h|.

Run: PYTHONPATH=src .venv/bin/python benchmarks/s2t_statistics_gap.py --steps 50 [--prob-threshold 0.05] [--lr 3e-4]
(first run builds the demo model under runs/_demo_base, a few minutes)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prob-threshold", type=float, default=0.002, help="S2T's τ_p (the paper's 0.002)")
    ap.add_argument("--lr", type=float, default=None, help="optim.lr (default: the demo's 5e-5)")
    ap.add_argument("--output-dir", default=str(ROOT / "runs"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from stapo.config import build_config
    from stapo.data.problem_sets import load_problem_sets
    from stapo.data.prompts import render_prompts
    from stapo.distributed import LOCAL
    from stapo.objectives import TokenStats
    from stapo.objectives.training import build_objective, objective_from_config
    from stapo.rewards import RewardPool
    from stapo.rollout import training_generator
    from stapo.trainer import setup
    from stapo.trainer.loop import _reward_kwargs
    from stapo.trainer.phases import (
        MetricMean,
        ProblemSampler,
        accumulate_gradients,
        attach_advantages,
        clip_and_step,
        compute_old_logprobs,
        generate_rollouts,
        plan_minibatch,
        score_rollouts,
    )

    cfg = build_config(str(ROOT / "configs" / "demo.yaml"),
                       ["objective.name=stapo", f"seed={args.seed}", f"output_dir={args.output_dir}",
                        f"objective.options={{prob_threshold: {args.prob_threshold}}}"]
                       + ([f"optim.lr={args.lr}"] if args.lr else []))
    setup.seed_everything(cfg.seed)
    device = torch.device("cpu")
    model, tok = setup.load_policy(cfg, device, None, log=lambda *a: print(*a, file=sys.stderr))
    model.train()
    optimizer, _ = setup.build_optimizer(model, cfg)
    train_set, _ = load_problem_sets(cfg)
    sampler = ProblemSampler(train_set, cfg.seed, cfg.data.shuffle)
    generator = training_generator(cfg, model, tok, LOCAL)
    current = objective_from_config(cfg)
    rollout = build_objective(cfg.objective.name, cfg.objective.options, statistics="rollout")
    rows = cfg.optim.mini_batch_prompts * cfg.rollout.n
    totals = {k: 0 for k in ("minibatches", "valid", "silenced_current", "silenced_rollout", "differ", "union")}
    tau_gaps = []
    with RewardPool(**_reward_kwargs(cfg)) as pool:
        for _ in range(args.steps):
            problems = sampler.next(cfg.rollout.prompts_per_step)
            batch = generate_rollouts(generator, tok, problems, render_prompts(problems, tok, cfg), cfg.rollout)
            batch, _ = score_rollouts(pool, batch)
            batch = attach_advantages(batch, cfg.rollout.n, cfg.objective.advantage)
            batch = batch.with_rollout_stats(compute_old_logprobs(
                model, batch, cfg.rollout.temperature, cfg.optim.micro_batch_size, device, with_collision=False))
            for k, mb in enumerate(batch.split(rows)):
                micros = mb.split(cfg.optim.micro_batch_size)
                plan, denominator = plan_minibatch(model, current, micros, cfg.rollout.temperature,
                                                   params_fresh=k == 0)
                if k > 0:  # the first mini-batch's statistics are the rollout policy's under both
                    other = rollout.plan([TokenStats(m.old_logprobs, m.old_entropy, m.advantages, m.response_mask)
                                          for m in micros])
                    for m, a, b in zip(micros, plan.keep_masks, other.keep_masks):
                        valid = m.response_mask.bool()
                        sa, sb = valid & ~a, valid & ~b
                        totals["valid"] += int(valid.sum())
                        totals["silenced_current"] += int(sa.sum())
                        totals["silenced_rollout"] += int(sb.sum())
                        totals["differ"] += int((sa ^ sb).sum())
                        totals["union"] += int((sa | sb).sum())
                    totals["minibatches"] += 1
                    tau_a, tau_b = plan.config.entropy_threshold, other.config.entropy_threshold
                    if all(t not in (None, float("-inf")) for t in (tau_a, tau_b)):
                        tau_gaps.append(abs(tau_a - tau_b))
                optimizer.zero_grad(set_to_none=True)
                loss, _ = accumulate_gradients(model, current, plan, denominator, micros, cfg, LOCAL, MetricMean())
                clip_and_step(model, optimizer, cfg.optim.grad_clip, loss)
            generator.update_weights(model)
    t = totals
    print(f"demo stapo τ_p = {args.prob_threshold}, lr {cfg.optim.lr}, seed {args.seed}, {args.steps} steps, {t['minibatches']} mini-batches after the first")
    print(f"valid tokens {t['valid']}; silenced: current {t['silenced_current']} "
          f"({t['silenced_current'] / max(t['valid'], 1):.3%}), rollout {t['silenced_rollout']} "
          f"({t['silenced_rollout'] / max(t['valid'], 1):.3%})")
    print(f"tokens whose status differs: {t['differ']} = {t['differ'] / max(t['valid'], 1):.4%} of valid tokens, "
          f"{t['differ'] / max(t['union'], 1):.1%} of the union of silenced tokens")
    if tau_gaps:
        print(f"mean |Δτ_h| {sum(tau_gaps) / len(tau_gaps):.4f} nats over {len(tau_gaps)} mini-batches")


if __name__ == "__main__":
    main()
