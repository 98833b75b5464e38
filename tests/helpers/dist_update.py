"""Run under torchrun (or alone): one rollout batch, `update_policy` on this rank's share.

Every rank builds the same global batch (same seed), keeps its rows, and updates the policy
with the given strategy. Writes the final parameters and the mini-batch thresholds each rank
saw to OUT_DIR/OBJECTIVE, for tests/test_distributed.py to compare with a single-process run.
OBJECTIVES is comma-separated: each starts from the saved model again, in one process group
(one start-up for all of them).
"""

import json
import sys
from pathlib import Path

import torch

from stapo.objectives.training import objective_from_config


def main(model_dir: str, out_dir: str, strategy: str, objectives: str, steps: int) -> None:
    from stapo.distributed import init_distributed, shutdown

    torch.set_num_threads(1)
    ctx = init_distributed(strategy, "cpu")
    for objective in objectives.split(","):
        out = Path(out_dir) / objective
        out.mkdir(parents=True, exist_ok=True)
        update(model_dir, out, strategy, objective, steps, ctx)
    shutdown(ctx)


def update(model_dir: str, out: Path, strategy: str, objective: str, steps: int, ctx) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.config import build_config
    from stapo.distributed import gather_variable, wrap_model
    from stapo.objectives import TokenStats, minibatch_overrides
    from stapo.rollout import HFGenerator, SamplingConfig, collate_rollouts
    from stapo.trainer import phases

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(f"Compute {a} + {b}.")["input_ids"] for a, b in [(1, 2), (30, 4), (55, 61), (7, 70)]]
    gens = HFGenerator(model, tok).generate(prompts, SamplingConfig(max_new_tokens=10, n=4, seed=3))
    batch = collate_rollouts(list("abcd"), prompts, gens, tok.pad_token_id)
    batch.rewards = torch.tensor([float(len(t) % 3 == 0) for t in batch.response_texts])
    batch = phases.attach_advantages(batch, 4, "grpo")
    options = {"stapo": "{prob_threshold: 0.3}", "entropy20": "{}"}[objective]
    cfg = build_config(None, [f"objective.name={objective}", f"objective.options={options}",
                              "rollout.prompts_per_step=4", "rollout.n=4", "optim.mini_batch_prompts=4",
                              "optim.micro_batch_size=3", "optim.grad_clip=1e9", f"parallel.strategy={strategy}"])
    share = len(batch) // ctx.world_size
    batch = batch.select(slice(ctx.rank * share, (ctx.rank + 1) * share))  # whole groups: 8 rows = 2 prompts
    batch = batch.with_rollout_stats(phases.compute_old_logprobs(model, batch, 1.0, 4, "cpu",
                                                                 with_collision=False))
    model = wrap_model(model, ctx, torch.device("cpu"))
    # SGD: the update is −lr·grad, so any error in the global normalisation shows in the weights
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    thresholds = []
    for step in range(steps):
        micros = batch.split(cfg.optim.micro_batch_size)
        if step == 0:
            stats = [TokenStats(m.old_logprobs, m.old_entropy, m.advantages, m.response_mask) for m in micros]
        else:  # the statistics update_policy itself takes from the current policy
            stats = [phases._current_stats(model, m, 1.0) for m in micros]
        thresholds.append(minibatch_overrides(objective, stats, gather_variable if ctx.world_size > 1 else None,
                                              **cfg.objective.options)["entropy_threshold"])
        phases.update_policy(model, opt, batch, cfg, "cpu", params_fresh=step == 0, ctx=ctx,
                             objective=objective_from_config(cfg))
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = getattr(model, "module", model).state_dict()
    (out / f"thresholds_rank{ctx.rank}.json").write_text(json.dumps([t.hex() for t in thresholds]))
    if ctx.rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in state.items() if k != "lm_head.weight"},
                  str(out / "params.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
