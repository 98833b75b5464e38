"""Under torchrun (2 gloo ranks) or alone: the Clip-Cov / KL-Cov plans of one mini-batch.

Every rank builds the same 12-row batch and plans its half with the ranks' collectives; alone, the
whole batch. Writes (or prints) the tokens each selection acts on, as whole-batch (row, column)s.
"""

import json
import os
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from float64_reference import random_batch
    from stapo.distributed import all_reduce_sum, gather_variable
    from stapo.objectives import TokenStats, build_objective

    torch.set_num_threads(1)
    ranked = "RANK" in os.environ
    if ranked:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    batch = random_batch(3, 12, 9, ratio_scale=0.3, layout="holes")
    share = 12 // world
    rows = slice(rank * share, (rank + 1) * share)
    mask = batch["response_mask"][rows]
    # this rank's rows as two micro-batches
    stats = [TokenStats(batch["logprobs"][rows][i:i + 3], None, batch["advantages"][rows][i:i + 3], mask[i:i + 3],
                        None, batch["old_logprobs"][rows][i:i + 3]) for i in range(0, share, 3)]
    gather = gather_variable if ranked else None

    def acted(name, opts, penalised):
        torch.manual_seed(11 + rank)  # a rank's own generator, as the trainer seeds seed + rank
        plan = build_objective(name, opts).plan(stats, gather, all_reduce_sum)
        keep = torch.cat(plan.keep_masks)
        hit = keep if penalised else mask & ~keep
        return sorted([b + rank * share, t] for b, t in torch.nonzero(hit).tolist()), plan.denominator

    result = {"kl_cov": acted("kl_cov", {"kl_cov_ratio": 0.05}, True)[0],
              "candidates": acted("clip_cov", {"clip_cov_ratio": 1.0}, False)[0]}
    detached, result["denominator"] = acted("clip_cov", {"clip_cov_ratio": 0.05}, False)
    result["detached_count"] = len(detached)
    if ranked:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
