"""verl's real FSDP2 engine on CPU (one gloo process) under the stapo hook, against stapo.policy_loss.

Run by tests/test_verl_fsdp.py in a fresh process (VERL_PLATFORM=cpu must be set before verl
resolves its platform), alone or under torchrun with 2 processes (each rank trains its contiguous half
of the mini-batch; FSDP2 shards the model over both), with ``use_remove_padding`` off or on (verl's
default and the documented command's: packed sequences, no pad tokens in the forward). Rank 0 prints one JSON line per micro-batch
split: the engine's loss (summed over micro-batches, averaged over ranks as verl reports it) and its
gradient's largest difference from stapo's whole-batch fp32 reference.
"""

from __future__ import annotations

import functools
import json
import os
import sys


def main(model_dir: str, remove_padding: bool = False) -> None:
    os.environ["VERL_PLATFORM"] = "cpu"
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)  # torchrun sets them for 2 processes
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    import torch.distributed as dist

    import helpers.verl_cpu_platform  # noqa: F401  (registers the "cpu" platform)

    dist.init_process_group("gloo")
    from transformers import AutoModelForCausalLM
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import HFModelConfig
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.utils.losses import ppo_loss

    import stapo
    from helpers.verl_engine import (
        actor_config,
        padded_stats,
        rollout_tensordict,
        train_data,
        with_old_log_probs,
    )
    from stapo.integrations import verl as sv

    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=["cpu"])(
        FSDPEngineWithLMHead)
    torch.set_num_threads(1)
    reference_model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").float()
    data = with_old_log_probs(reference_model, rollout_tensordict(reference_model.config.vocab_size, n=8, seed=0))
    lp, ent = padded_stats(reference_model, data)
    mask, adv = data["response_mask"].bool(), data["advantages"]
    tau_p = float(lp.detach()[mask & (adv > 0)].median().exp())
    config = actor_config("actor_rollout_ref.actor.policy_loss.loss_mode=stapo", "actor_rollout_ref.actor.strategy=fsdp2",
                          f"actor_rollout_ref.actor.policy_loss.tau_p={tau_p!r}",
                          "actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.clip_ratio_c=10.0",
                          "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32")
    loss, metrics = stapo.policy_loss("stapo", lp, data["old_log_probs"], adv, mask, entropy=ent,
                                      **sv.objective_options("stapo", config))
    loss.backward()
    model_config = HFModelConfig(path=model_dir, use_remove_padding=remove_padding,
                                 override_config={"attn_implementation": "eager"})
    engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                engine_config=config.engine, optimizer_config=config.optim,
                                checkpoint_config=config.checkpoint)
    engine.initialize()
    grads = {}
    step = engine.optimizer_step

    def capture_then_step():  # the engine's gradient, before its AdamW step
        for name, p in engine.module.named_parameters():
            grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        return step()

    engine.optimizer_step = capture_then_step
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    share = len(data) // world  # verl's dispatch hands each DP rank a contiguous chunk
    shard = tu.index_select_tensor_dict(data, list(range(rank * share, (rank + 1) * share)))
    # verl's dynamic-batch balancing all-reduces a CUDA tensor over DP ranks: token budgets only alone
    splits = [{"micro_batch_size": 2}] + ([{"max_token_len": 24}] if world == 1 else [])
    for split in splits:
        engine.module.load_state_dict(state)  # undo the previous split's step
        with engine.train_mode():
            out = engine.train_batch(train_data(shard, **split), functools.partial(ppo_loss, config=config))
        diff = max((grads[n] - q.grad).abs().max().item() for n, q in reference_model.named_parameters())
        total = torch.tensor(sum(out["loss"]), dtype=torch.float64)
        dist.all_reduce(total)  # each rank's loss is its share of the global mean (times DP size)
        if rank == 0:
            print(json.dumps({"split": split, "ranks": world, "remove_padding": remove_padding, "loss": float(total) / world,
                              "reference_loss": float(loss), "grad_diff": diff,
                              "silenced": float(metrics["s2t/silenced"]), "engine": type(engine).__name__}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], remove_padding=sys.argv[2:] == ["remove_padding"])
