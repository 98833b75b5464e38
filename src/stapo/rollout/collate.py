"""Generations -> ``RolloutBatch`` (tensors padded, responses of a prompt contiguous)."""

from __future__ import annotations

import torch

from ..batch import RolloutBatch, left_pad
from .base import Generation


def collate_rollouts(
    problems: list,
    prompt_ids: list[list[int]],
    generations: list[list[Generation]],
    pad_token_id: int,
    *,
    mask_truncated: bool = False,
) -> RolloutBatch:
    """Build the step's batch. ``generations[i]`` holds the G samples of ``problems[i]``.

    Shapes out: prompt_ids [P·G, Lp] (left-padded), response_ids [P·G, T] (right-padded).
    ``mask_truncated`` drops responses that hit the length limit from the loss (DAPO's
    overlong filtering) by zeroing their ``response_mask``.
    """
    rows = [(i, g) for i, gens in enumerate(generations) for g in gens]
    if not rows:
        raise ValueError("no generations to collate")
    t = max(1, max(len(g.response_ids) for _, g in rows))
    n = len(rows)
    p_ids, p_mask = left_pad([prompt_ids[i] for i, _ in rows], pad_token_id)
    r_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    r_mask = torch.zeros((n, t), dtype=torch.bool)
    has_lp = all(g.logprobs is not None for _, g in rows)
    r_lp = torch.zeros((n, t), dtype=torch.float32) if has_lp else None
    truncated = torch.zeros(n, dtype=torch.bool)
    for row, (_, g) in enumerate(rows):
        k = len(g.response_ids)
        if k:
            r_ids[row, :k] = torch.tensor(g.response_ids, dtype=torch.long)
            r_mask[row, :k] = True
            if has_lp:
                r_lp[row, :k] = torch.tensor(g.logprobs, dtype=torch.float32)
        truncated[row] = g.finish_reason == "length"
    if mask_truncated:
        r_mask &= ~truncated.unsqueeze(-1)
    return RolloutBatch(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        response_ids=r_ids,
        response_mask=r_mask,
        group_ids=torch.tensor([i for i, _ in rows], dtype=torch.long),
        truncated=truncated,
        response_lengths=torch.tensor([len(g.response_ids) for _, g in rows], dtype=torch.long),
        problems=[problems[i] for i, _ in rows],
        response_texts=[g.text for _, g in rows],
        rollout_logprobs=r_lp,
    )
