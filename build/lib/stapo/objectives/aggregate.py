"""The one loss reduction every objective uses (verl's ``agg_loss`` modes).

Shapes: loss_mat, mask: [B, T].

``denominator`` makes the reduction independent of how a mini-batch is split:
pass the *global* count of units (tokens for ``token-mean``, sequences for the
``seq-mean-*`` modes) over the whole optimizer mini-batch, across micro-batches
and ranks. Then summing the micro-batch losses gives exactly the whole-batch loss
(the error verl issue 5625 describes is normalising per micro-batch instead).
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def count_units(mask: torch.Tensor, mode: str) -> int:
    """Local number of units ``agg_loss`` divides by: valid tokens, or non-empty sequences."""
    _check_mode(mode)
    mask = mask.bool()
    if mode == "token-mean":
        return int(mask.sum())
    return int(mask.any(dim=-1).sum())


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    denominator: float | None = None,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

    - token-mean:               Σ_{b,t} l·m / Σ m                      (DAPO)
    - seq-mean-token-mean:      mean_b [Σ_t l·m / Σ_t m]                (GRPO)
    - seq-mean-token-sum:       mean_b [Σ_t l·m]
    - seq-mean-token-sum-norm:  mean_b [Σ_t l·m / L]   L = norm_length  (Dr. GRPO's constant)

    Sequences with no valid token are not counted. An all-masked input gives 0
    (with a zero, not NaN, gradient).
    """
    _check_mode(mode)
    m = mask.to(loss_mat.dtype)
    # where, not loss_mat * m: a NaN/inf at a masked position must not turn the sum into NaN
    masked = torch.where(mask.bool(), loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "token-mean":
        denom = m.sum() if denominator is None else denominator
        return masked.sum() / _at_least_one(denom, loss_mat)
    tokens_per_seq = m.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / tokens_per_seq.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_seq = masked.sum(dim=-1)
    else:
        length = loss_mat.shape[-1] if norm_length is None else norm_length
        per_seq = masked.sum(dim=-1) / float(length)
    denom = (tokens_per_seq > 0).sum() if denominator is None else denominator
    return per_seq.sum() / _at_least_one(denom, loss_mat)


def _at_least_one(denom, like: torch.Tensor):
    if isinstance(denom, torch.Tensor):
        return denom.to(like.dtype).clamp(min=1.0)
    return max(float(denom), 1.0)


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; choose one of {', '.join(AGG_MODES)}")
