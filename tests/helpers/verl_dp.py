"""One data-parallel rank of tests/test_verl_distributed.py (2 processes, gloo).

Every rank builds the same global mini-batch (same seeds), keeps its half of the rows as verl's
dispatch does, and runs verl's BaseEngine.train_batch with the stapo hook and verl's ppo_loss on
it. The engine averages gradients over ranks (as FSDP does) and saves them for the parent.
"""

from __future__ import annotations

import functools
import os
import sys


def run_rank(rank: int, world: int, port: int, out_dir: str, tau_p: float, split: dict) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from safetensors.torch import save_file
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.losses import ppo_loss

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from helpers.verl_engine import CPUEngine, actor_config, dp_model_and_data, train_data

        model, data = dp_model_and_data()
        share = len(data) // world  # verl's dispatch hands each DP rank a contiguous chunk
        shard = tu.index_select_tensor_dict(data, list(range(rank * share, (rank + 1) * share)))
        config = actor_config("actor_rollout_ref.actor.policy_loss.loss_mode=stapo",
                              f"actor_rollout_ref.actor.policy_loss.tau_p={tau_p!r}",
                              "actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.clip_ratio_c=10.0")
        engine = CPUEngine(model, group=dist.group.WORLD)
        engine.train_batch(train_data(shard, **split), functools.partial(ppo_loss, config=config))
        save_file({k: v.contiguous() for k, v in engine.grads.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()
