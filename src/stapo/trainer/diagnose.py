"""Token-level diagnostics inside the training step, whatever the objective trains.

They describe the step's rollouts under the rollout policy (``old_logprobs``, its entropy
and collision probability, ρ = 1), split into the same optimizer mini-batches as the
update so τ_h is the one S2T uses. A GRPO run therefore shows what STAPO would silence.
A token-selecting objective's ``select/*`` metrics read the tokens its plan acted on in the
step's first sweep (``PolicyUpdate.selected``, returned by ``update_policy``).
"""

from __future__ import annotations

import torch

from ..diagnostics import DiagnosticsAccumulator, diagnostic_entropy_threshold, dump_rollouts
from ..distributed import LOCAL, DistContext, gather_variable
from ..objectives.training import TrainingObjective


class StepDiagnostics:
    def __init__(self, cfg, objective: TrainingObjective, vocab_size: int, ctx: DistContext = LOCAL):
        self.enabled = cfg.diagnostics.enabled
        self.vocab_size, self.ctx, self.action = vocab_size, ctx, objective.spec.action
        self.rows = cfg.optim.mini_batch_prompts // ctx.world_size * cfg.rollout.n
        obj_cfg = objective.config  # the run's, built once by the loop
        # quadrant cuts default to the S2T settings; a stapo run's own τ_p / q take precedence
        self.prob_threshold = getattr(obj_cfg, "prob_threshold", cfg.diagnostics.prob_threshold)
        self.entropy_quantile = getattr(obj_cfg, "entropy_quantile", cfg.diagnostics.entropy_quantile)
        self.clip = {"clip_low": obj_cfg.clip_low, "clip_high": obj_cfg.clip_high, "clip_ratio_c": obj_cfg.clip_ratio_c}

    def measure(self, batch, selected: torch.Tensor | None = None) -> dict[str, float]:
        """``diag/*`` (and, with ``selected`` [B, T], ``select/*``) metrics of the step's batch, which
        carries the rollout policy's statistics (all ranks take part; identical result on each)."""
        if not self.enabled or batch.old_collision is None:
            return {}
        acc = DiagnosticsAccumulator()
        gather = gather_variable if self.ctx.world_size > 1 else None
        for start, mb in zip(range(0, len(batch), self.rows), batch.split(self.rows)):
            tau = diagnostic_entropy_threshold(
                [(mb.old_logprobs, mb.old_entropy, mb.advantages, mb.response_mask)],
                self.prob_threshold, self.entropy_quantile, gather,
            )
            acc.add(mb.old_logprobs, mb.old_entropy, mb.old_collision, mb.advantages, mb.old_logprobs,
                    mb.response_mask, vocab_size=self.vocab_size, prob_threshold=self.prob_threshold,
                    entropy_threshold=tau, entropy_quantile=self.entropy_quantile,
                    selected=None if selected is None else selected[start:start + self.rows],
                    **self.clip)
        if self.ctx.world_size > 1:
            import torch.distributed as dist

            def reduce(op):
                def fn(t: torch.Tensor) -> torch.Tensor:
                    dist.all_reduce(t, op=op)
                    return t
                return fn

            acc.all_reduce(reduce(dist.ReduceOp.SUM), reduce(dist.ReduceOp.MAX))
        return acc.finalize()

    def dump(self, path, batch, selected: torch.Tensor | None, tokenizer, step: int) -> None:
        """Per-token parquet of this rank's rollouts (p, H, A, ρ, masks, quadrant, ``selected``)."""
        if batch.old_collision is None:
            return
        dump_rollouts(path, batch, step=step, logprobs=batch.old_logprobs, entropy=batch.old_entropy,
                      collision=batch.old_collision, tokenizer=tokenizer, vocab_size=self.vocab_size,
                      prob_threshold=self.prob_threshold, entropy_quantile=self.entropy_quantile,
                      selected=selected, action=self.action, **self.clip)
