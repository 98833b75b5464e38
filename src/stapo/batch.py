"""The typed values a step's phases pass forward: rollout -> reward -> advantage -> loss.

Each phase returns a new ``RolloutBatch`` (``dataclasses.replace``) with the fields it produced;
none writes into the batch it was given. ``RolloutStats`` is phase 5's product: the rollout
policy's per-token statistics, from a separate no-grad pass or from the update's first forward.

Shapes: B = responses in the batch (P prompts × G samples, a group contiguous),
Lp = prompt length (left-padded), T = response length (right-padded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [B, Lp] long, left-padded
    prompt_mask: torch.Tensor  # [B, Lp] bool, True = real prompt token
    response_ids: torch.Tensor  # [B, T] long, right-padded
    response_mask: torch.Tensor  # [B, T] bool, True = token enters the loss
    group_ids: torch.Tensor  # [B] long, which prompt of the step each response answers
    truncated: torch.Tensor  # [B] bool, hit max_new_tokens without EOS
    response_lengths: torch.Tensor  # [B] long, generated tokens (EOS included), whatever the mask says
    problems: list[Any] = dataclasses.field(default_factory=list)  # B records (stapo.data.Problem)
    response_texts: list[str] = dataclasses.field(default_factory=list)  # B decoded responses
    rewards: torch.Tensor | None = None  # [B] float
    advantages: torch.Tensor | None = None  # [B] or [B, T] float
    old_logprobs: torch.Tensor | None = None  # [B, T] float, policy before the update, at rollout T
    ref_logprobs: torch.Tensor | None = None  # [B, T] float, reference policy (only when β > 0)
    rollout_logprobs: torch.Tensor | None = None  # [B, T] float, as reported by the generation engine
    old_entropy: torch.Tensor | None = None  # [B, T] float, entropy of the policy that computed old_logprobs
    old_collision: torch.Tensor | None = None  # [B, T] float, its collision probability Σ_v π_v²
    teacher_logprobs: torch.Tensor | None = None  # [B, T] float, privileged-context pass (DASD)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def with_rollout_stats(self, stats: RolloutStats) -> RolloutBatch:
        """This batch with the rollout policy's statistics as its ``old_*`` (and reference) fields."""
        return dataclasses.replace(self, old_logprobs=stats.logprobs, old_entropy=stats.entropy,
                                   old_collision=stats.collision, ref_logprobs=stats.ref_logprobs)

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, Lp + T] prompt then response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, Lp + T]: real prompt tokens and every response position up to its last valid token."""
        resp = self.response_mask.bool() | _before_last_valid(self.response_mask)
        return torch.cat([self.prompt_mask.bool(), resp], dim=1).long()

    def select(self, index) -> RolloutBatch:
        """Rows ``index`` (a slice, list or long tensor, or a [B] bool mask) of every per-row field."""
        every = range(len(self))
        if isinstance(index, slice):
            rows = list(every[index])
        else:
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:  # e.g. select(rewards > 0): as ints it would pick rows 0 and 1
                if index.shape != (len(self),):
                    raise ValueError(f"bool row mask has shape {tuple(index.shape)}, expected ({len(self)},)")
                index = index.nonzero().view(-1)
            rows = [every[int(i)] for i in index.view(-1)]  # range indexing: negatives ok, IndexError past the end
        idx = torch.tensor(rows, dtype=torch.long)
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value.index_select(0, idx.to(value.device))
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in rows] if value else []
            else:
                out[f.name] = value
        return RolloutBatch(**out)

    def split(self, size: int) -> list[RolloutBatch]:
        """Consecutive pieces of ``size`` rows (the last may be shorter)."""
        if size < 1:
            raise ValueError(f"split size must be >= 1, got {size}")
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def to(self, device) -> RolloutBatch:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @staticmethod
    def concat(batches: list[RolloutBatch], pad_token_id: int = 0) -> RolloutBatch:
        """Stack batches row-wise, re-padding prompts (left) and responses (right) to a common length."""
        if not batches:
            raise ValueError("nothing to concatenate")
        lp = max(b.prompt_ids.shape[1] for b in batches)
        t = max(b.response_ids.shape[1] for b in batches)
        out = {}
        for f in dataclasses.fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            if all(v is None for v in values):
                out[f.name] = None
                continue
            # a field present in some batches only (or [B] in one and [B, T] in another) would
            # otherwise come out misaligned with the rows, or crash deep inside torch.cat
            if any(v is None for v in values):
                raise ValueError(f"cannot concat RolloutBatch: field {f.name!r} is set in some batches only")
            if isinstance(values[0], list):
                merged = [x for v in values for x in v]
                if merged and len(merged) != sum(len(b) for b in batches):
                    raise ValueError(f"cannot concat RolloutBatch: field {f.name!r} is set in some batches only")
                out[f.name] = merged
            elif len({v.dim() for v in values}) > 1:
                raise ValueError(f"cannot concat RolloutBatch: field {f.name!r} has different ranks")
            elif f.name in ("prompt_ids", "prompt_mask"):
                pad = pad_token_id if f.name == "prompt_ids" else 0
                out[f.name] = torch.cat([_pad_to(v, lp, pad, left=True) for v in values])
            elif values[0].dim() == 2:
                pad = pad_token_id if f.name == "response_ids" else 0
                out[f.name] = torch.cat([_pad_to(v, t, pad, left=False) for v in values])
            else:
                out[f.name] = torch.cat(values)
        return RolloutBatch(**out)


@dataclasses.dataclass(frozen=True)
class RolloutStats:
    """The rollout policy's per-token statistics of a batch's responses, at the rollout temperature (CPU, fp32)."""

    logprobs: torch.Tensor  # [B, T]
    entropy: torch.Tensor  # [B, T]
    collision: torch.Tensor | None = None  # [B, T] Σ_v π_v², when the diagnostics read it
    ref_logprobs: torch.Tensor | None = None  # [B, T] the frozen reference's (only when β > 0)


def _before_last_valid(mask: torch.Tensor) -> torch.Tensor:
    """True at positions at or before the last True of each row (so masked-out tokens stay attended)."""
    m = mask.bool()
    flipped = torch.cumsum(m.flip(-1).long(), dim=-1).flip(-1)
    return flipped > 0


def _pad_to(x: torch.Tensor, length: int, value, *, left: bool) -> torch.Tensor:
    missing = length - x.shape[1]
    if missing <= 0:
        return x
    pad = torch.full((x.shape[0], missing), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids [N, L] long, mask [N, L] bool), left-padded to the longest row.

    Prompts are left-padded everywhere (generation continues from the last column; the
    response starts at the same column in every row).
    """
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = True
    return ids, mask
