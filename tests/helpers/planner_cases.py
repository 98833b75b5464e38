"""Identical per-token statistics for the planner tests of every path (stapo's trainer, TRL, verl).

Pure torch, so tests/test_planner.py (main environment, TRL) and tests/test_verl_loss.py (verl's
environment) feed the very same tensors to ``stapo.plan_minibatch`` through each integration.
"""

from __future__ import annotations

import types

import torch

from stapo.objectives import TokenStats

TAU_P = 0.05  # log p ~ U(-9, 0): about a third of the positive-advantage tokens are S2T candidates


def micro_batches(seed: int = 0, micros: int = 2, rows: int = 4, width: int = 7) -> list[TokenStats]:
    """``micros`` micro-batches of ``rows`` right-padded responses: [rows, width] float32 statistics."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(micros):
        lengths = torch.randint(2, width + 1, (rows,), generator=g)
        lengths[0] = width
        mask = torch.arange(width)[None, :] < lengths[:, None]  # [rows, width] bool
        logprobs = (-9.0 * torch.rand(rows, width, generator=g)).masked_fill(~mask, 0.0)
        entropy = (3.0 * torch.rand(rows, width, generator=g)).masked_fill(~mask, 0.0)
        advantages = torch.randn(rows, generator=g)  # [rows], per sequence as GRPO gives it
        out.append(TokenStats(logprobs, entropy, advantages, mask))
    return out


def micro_view(stats: TokenStats):
    """What ``TrainingObjective.loss`` reads off a micro-batch (its advantages and mask; no reference)."""
    return types.SimpleNamespace(advantages=stats.advantages, response_mask=stats.response_mask,
                                 ref_logprobs=None, teacher_logprobs=None)
