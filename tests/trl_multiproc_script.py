"""Run by test_trl_multiprocess.py: ``accelerate launch --multi_gpu --num_processes 2 trl_multiproc_script.py OUT``
on CPUs (``use_cpu=True`` makes accelerate use gloo; see the test for why not ``--cpu``).

Two optimizer steps of STAPOTrainer, 2 accumulation micro-batches per process; each process saves
its S2T plans and the per-token statistics behind them to OUT/rank{r}.pt for the test to check.
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stapo.integrations.trl import STAPOConfig
from trl_common import (
    BASE,
    HIGH_PROB_THRESHOLD,
    RecordingTrainer,
    digit_fraction,
    prompts,
    tiny_model_and_tok,
)


def main(out: pathlib.Path) -> None:
    torch.set_num_threads(1)
    config = STAPOConfig(output_dir=str(out / "run"), **{**BASE, "max_steps": 2, "gradient_accumulation_steps": 2,
                                                         "s2t_prob_threshold": HIGH_PROB_THRESHOLD})
    model, tok = tiny_model_and_tok()
    trainer = RecordingTrainer(model=model, reward_funcs=digit_fraction, args=config, train_dataset=prompts(),
                               processing_class=tok)
    trainer.train()
    plans = [
        {
            "step": step,
            "threshold": plan.threshold,
            "counts": (plan.valid, plan.candidates, plan.silenced_count),
            "num_items_in_batch": float(plan.num_items_in_batch),
            "silenced": [m.cpu() for m in plan.silenced],
            "stats": [{k: getattr(s, k).detach().cpu() for k in ("logprobs", "entropy", "advantages", "response_mask")}
                      for s in stats],
        }
        for step, plan, stats in trainer.plans
    ]
    rank = trainer.accelerator.process_index
    torch.save({"world": trainer.accelerator.num_processes, "plans": plans, "log_history": trainer.state.log_history},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
