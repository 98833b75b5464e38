"""Token masks shared by objectives, diagnostics and integrations.

Shapes (B = sequences, T = response length):
    logprobs, entropy, response_mask:  [B, T]
    advantages:                        [B] or [B, T]

Both masks take their statistic (a quantile of entropies) over *the optimizer
mini-batch*. When a mini-batch is split into micro-batches, or across ranks,
compute the threshold once with the ``*_threshold`` helpers on all of it and pass
it in as ``entropy_threshold`` so every piece applies the same cut. The official
20-Entropy code takes the quantile per micro-batch; that makes the mask depend
on the micro-batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .configs import Entropy20Config, STAPOConfig

# the paper defaults, read from the objectives' config dataclasses (their one place)
TAU_P, QUANTILE, TOP_RATIO = STAPOConfig.prob_threshold, STAPOConfig.entropy_quantile, Entropy20Config.top_ratio

__all__ = [
    "expand_advantages",
    "high_entropy_mask",
    "high_entropy_threshold",
    "quantile",
    "s2t_candidates",
    "s2t_mask",
    "s2t_silence",
    "s2t_threshold",
]

NO_CANDIDATES = float("-inf")  # τ_h when nothing is a candidate: `H < -inf` silences nothing


def expand_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, T] advantages -> [B, T] (broadcast per sequence)."""
    if advantages.dim() == 1:
        if advantages.shape[0] != like.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows but logprobs has {like.shape[0]}")
        return advantages.unsqueeze(-1).expand_as(like)
    if advantages.shape != like.shape:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} != logprobs shape {tuple(like.shape)}")
    return advantages


TORCH_QUANTILE_MAX = 2**24  # torch.quantile refuses larger inputs ("input tensor is too large")


def quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of a 1-D tensor, as ``torch.quantile`` (float64 for exact ties).

    Above ``TORCH_QUANTILE_MAX`` elements (a 20-Entropy cut over every valid token of a large
    mini-batch reaches it) the same interpolation is done on a full sort, as torch does it.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must be in [0, 1], got {q}")
    if values.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    values = values.detach().to(torch.float64).reshape(-1)
    if values.numel() <= TORCH_QUANTILE_MAX:
        return float(torch.quantile(values, q))
    ordered = values.sort().values  # [N]
    rank = torch.tensor(q * (ordered.numel() - 1), dtype=torch.float64)
    below, above = rank.floor().long(), rank.ceil().long()
    # torch.quantile's linear mode: lerp(v[floor(r)], v[ceil(r)], r - floor(r))
    return float(torch.lerp(ordered[below], ordered[above], rank - below))


def _check_level(name: str, value: float, *, open_low: bool = False) -> None:
    """A clear error naming the option, even when the data would never reach the quantile."""
    above_low = value > 0.0 if open_low else value >= 0.0
    if not (above_low and value <= 1.0):  # written so NaN fails too
        raise ValueError(f"{name} must be in {'(0' if open_low else '[0'}, 1], got {value}")


def s2t_candidates(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    prob_threshold: float = TAU_P,
) -> torch.Tensor:
    """S2T candidates: valid tokens with A > 0 and current-policy p < τ_p.  Shape [B, T], bool."""
    adv = expand_advantages(advantages, logprobs).detach()
    # p < τ_p as log p < log τ_p in float64, without an exp over every token: the same cut as
    # exp(log p) < τ_p (they could differ only within an ulp of τ_p); τ_p = 0 gives -inf: no candidate
    log_tau = math.log(prob_threshold) if prob_threshold > 0 else float("-inf")
    return response_mask.bool() & (adv > 0) & (logprobs.detach().to(torch.float64) < log_tau)


def s2t_threshold(
    micro_batches: Iterable[Sequence[torch.Tensor]],
    prob_threshold: float = TAU_P,
    entropy_quantile: float = QUANTILE,
    gather=None,
) -> float:
    """τ_h over a whole mini-batch given as micro-batches of (logprobs, entropy, advantages, response_mask).

    ``gather`` (optional) maps the local 1-D candidate entropies to the concatenation
    over all ranks; see ``stapo.distributed.gather_variable``. Returns -inf when there
    is no candidate anywhere, which silences nothing.
    """
    _check_level("entropy_quantile", entropy_quantile)
    parts = []
    for logprobs, entropy, advantages, response_mask in micro_batches:
        cand = s2t_candidates(logprobs, advantages, response_mask, prob_threshold)
        parts.append(entropy.detach().to(torch.float64)[cand])
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if gather is not None:
        values = gather(values)
    return quantile(values, entropy_quantile) if values.numel() else NO_CANDIDATES


def s2t_mask(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    prob_threshold: float = TAU_P,
    entropy_quantile: float = QUANTILE,
    entropy_threshold: float | None = None,
) -> torch.Tensor:
    """Silencing Spurious Tokens (STAPO, Sec. 4): True = silenced.

    A token is silenced when it is valid, has A > 0, current-policy p < τ_p, and
    entropy H < τ_h, where τ_h is the ``entropy_quantile`` quantile of the
    candidates' entropies (linear interpolation, as ``torch.quantile``). Passing
    ``entropy_threshold`` uses that τ_h instead (the mini-batch-wide value).
    All inputs are used detached. No candidates -> nothing is silenced.
    """
    cand = s2t_candidates(logprobs, advantages, response_mask, prob_threshold)
    return s2t_silence(cand, entropy, entropy_quantile, entropy_threshold)[0]


def s2t_silence(
    candidates: torch.Tensor,
    entropy: torch.Tensor,
    entropy_quantile: float = QUANTILE,
    entropy_threshold: float | None = None,
) -> tuple[torch.Tensor, float]:
    """(silenced [B, T], τ_h) from the S2T candidates: candidates with entropy H < τ_h.

    τ_h is ``entropy_threshold`` when given, else the ``entropy_quantile`` quantile of the
    candidates' entropies; NaN when there is no candidate (nothing is silenced).
    """
    _check_level("entropy_quantile", entropy_quantile)
    ent = entropy.detach().to(torch.float64)
    if entropy_threshold is None:
        if not bool(candidates.any()):
            return torch.zeros_like(candidates), float("nan")
        entropy_threshold = quantile(ent[candidates], entropy_quantile)
    return candidates & (ent < entropy_threshold), entropy_threshold


def high_entropy_threshold(
    micro_batches: Iterable[Sequence[torch.Tensor]], top_ratio: float = TOP_RATIO, gather=None
) -> float:
    """20-Entropy cut over a whole mini-batch given as micro-batches of (entropy, response_mask).

    Returns the (1 - top_ratio) quantile of valid-token entropies, +inf if there are none.
    """
    _check_level("top_ratio", top_ratio, open_low=True)
    parts = [entropy.detach().to(torch.float64)[mask.bool()] for entropy, mask in micro_batches]
    values = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if gather is not None:
        values = gather(values)
    return quantile(values, 1.0 - top_ratio) if values.numel() else float("inf")


def high_entropy_mask(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    top_ratio: float = TOP_RATIO,
    entropy_threshold: float | None = None,
) -> torch.Tensor:
    """Beyond the 80/20 rule (Wang et al., 2025): True = kept (a top-``top_ratio`` entropy token)."""
    _check_level("top_ratio", top_ratio, open_low=True)
    valid = response_mask.bool()
    ent = entropy.detach().to(torch.float64)
    if entropy_threshold is None:
        entropy_threshold = high_entropy_threshold([(entropy, response_mask)], top_ratio)
    return valid & (ent >= entropy_threshold)
