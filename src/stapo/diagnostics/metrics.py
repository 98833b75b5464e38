"""Per-step token diagnostics for the trainer: quadrants, logit-gradient norms, predicted entropy change.

Shapes (B = sequences, T = response length), all inputs detached:
    logprobs, old_logprobs, entropy, collision, p2logp, response_mask, silenced  [B, T]
    advantages                                                                    [B] or [B, T]

The taxonomy (STAPO, Sec. 3) sorts every valid positive-advantage token into
{high, low} probability × {high, low} entropy. The cuts default to the S2T ones:
low-p is p < τ_p (``prob_threshold``); low-H is H < τ_h, where τ_h is the
``entropy_quantile`` quantile of the S2T candidates' entropies (valid, A > 0,
p < τ_p). When there is no candidate, τ_h falls back to the same quantile over
all valid positive-advantage tokens, so the entropy split stays meaningful (S2T
itself then silences nothing). The low-p/low-H quadrant is exactly the set S2T
silences whenever the thresholds are the S2T ones.

Everything works whatever objective trains: without a ``silenced`` mask from the
trainer, the S2T mask is computed here, so a GRPO run reports what STAPO would
have silenced, and the gradient share it would have removed.

Reduction across micro-batches and ranks: ``token_diagnostic_sums`` returns only
additive statistics (keys ``sum/...``, reduced by summing) and maxima (keys
``max/...``, reduced by max); ``finalize`` turns them into the logged ``diag/...``
metrics. ``DiagnosticsAccumulator`` wraps both. As for the S2T mask itself, pass a
mini-batch-wide ``entropy_threshold`` (``diagnostic_entropy_threshold``) when a
step is split, so every piece applies the same cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..objectives.losses import LOG_RATIO_CLAMP
from ..objectives.masks import QUANTILE, TAU_P, expand_advantages, quantile, s2t_candidates, s2t_mask
from . import theory

__all__ = [
    "QUADRANTS",
    "DiagnosticsAccumulator",
    "DiagnosticsConfig",
    "TokenFields",
    "diagnostic_entropy_threshold",
    "finalize",
    "finalize_selection",
    "quadrant_codes",
    "selection_sums",
    "token_diagnostic_sums",
    "token_diagnostics",
    "token_fields",
]

# quadrant code = 2·[p ≥ τ_p] + [H ≥ τ_h]; −1 marks tokens outside the taxonomy (invalid or A ≤ 0)
QUADRANTS = ("low_p_low_h", "low_p_high_h", "high_p_low_h", "high_p_high_h")
BOUND_ATOL = 1e-5  # on the bracket (1 − 2p + Σπ²) ∈ [0, 2]: float32 statistics from the trainer


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Settings of the taxonomy and of the surrogate weight w (defaults: STAPO's S2T and clip)."""

    vocab_size: int
    prob_threshold: float = TAU_P  # τ_p
    entropy_quantile: float = QUANTILE  # q of τ_h
    entropy_threshold: float | None = None  # τ_h given (mini-batch wide); None = this batch's own
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = 10.0

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not 0.0 < self.prob_threshold <= 1.0:
            raise ValueError(f"prob_threshold must be in (0, 1], got {self.prob_threshold}")
        if not 0.0 <= self.entropy_quantile <= 1.0:
            raise ValueError(f"entropy_quantile must be in [0, 1], got {self.entropy_quantile}")


class TokenFields(NamedTuple):
    """Per-token diagnostics, all [B, T] (float64 or bool), plus the τ_h used."""

    valid: torch.Tensor  # bool, response_mask
    positive: torch.Tensor  # bool, valid & A > 0
    prob: torch.Tensor  # p = exp(log π_k)
    advantage: torch.Tensor  # A broadcast to [B, T]
    ratio: torch.Tensor  # ρ = π / π_old
    weight: torch.Tensor  # w = ρA, 0 where clipped
    candidate: torch.Tensor  # bool, S2T candidate (valid, A > 0, p < τ_p)
    silenced: torch.Tensor  # bool, S2T-silenced (given by the trainer, or computed)
    quadrant: torch.Tensor  # long, index into QUADRANTS, −1 outside the taxonomy
    grad_norm: torch.Tensor  # ‖∇_z J‖ (exact, from Σπ²)
    grad_lower: torch.Tensor  # lower bound on ‖∇_z J‖²
    grad_upper: torch.Tensor  # upper bound on ‖∇_z J‖²
    grad_norm_sq: torch.Tensor  # ‖∇_z J‖²
    entropy_up_paper: torch.Tensor  # bool, p < e^{−H} (the paper's criterion for A > 0)
    dh_natural: torch.Tensor  # −A (log p + H), per unit step
    dh_exact: torch.Tensor | None  # −A [p(log p + H) − Σπ²(log π + H)], None without Σπ² log π
    entropy_threshold: float  # τ_h used for the quadrants (nan when there is no positive token)


def _entropy_cut(
    logprobs, entropy, advantages, response_mask, prob_threshold, entropy_quantile
) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate entropies, positive-advantage entropies) as 1-D float64 tensors."""
    adv = expand_advantages(advantages, logprobs).detach()
    pos = response_mask.bool() & (adv > 0)
    cand = s2t_candidates(logprobs, advantages, response_mask, prob_threshold)
    ent = entropy.detach().to(torch.float64)
    return ent[cand], ent[pos]


def diagnostic_entropy_threshold(
    micro_batches: Iterable[Sequence[torch.Tensor]],
    prob_threshold: float = TAU_P,
    entropy_quantile: float = QUANTILE,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """τ_h of the taxonomy over a whole mini-batch of (logprobs, entropy, advantages, response_mask).

    The S2T τ_h (``stapo.objectives.s2t_threshold``) when there are candidates; else the
    same quantile over valid positive-advantage tokens; nan when there is none of those.
    ``gather`` maps local 1-D values to their concatenation over ranks.
    """
    cand_parts, pos_parts = [], []
    for logprobs, entropy, advantages, response_mask in micro_batches:
        cand, pos = _entropy_cut(logprobs, entropy, advantages, response_mask, prob_threshold, entropy_quantile)
        cand_parts.append(cand)
        pos_parts.append(pos)
    empty = torch.zeros(0, dtype=torch.float64)
    cand = torch.cat(cand_parts) if cand_parts else empty
    pos = torch.cat(pos_parts) if pos_parts else empty
    if gather is not None:
        cand, pos = gather(cand), gather(pos)
    if cand.numel():
        return quantile(cand, entropy_quantile)
    return quantile(pos, entropy_quantile) if pos.numel() else float("nan")


def quadrant_codes(prob: torch.Tensor, entropy: torch.Tensor, positive: torch.Tensor, prob_threshold: float,
                   entropy_threshold: float) -> torch.Tensor:
    """Each token's index into QUADRANTS [B, T] long: 2·[p ≥ τ_p] + [H ≥ τ_h]; −1 unless ``positive``."""
    high_p = prob >= prob_threshold
    high_h = entropy >= entropy_threshold  # False everywhere when τ_h is nan, but then no token is positive
    code = 2 * high_p.long() + high_h.long()
    return torch.where(positive.bool(), code, torch.full_like(code, -1))


def selection_sums(selected: torch.Tensor, valid: torch.Tensor, quadrant: torch.Tensor,
                   silenced: torch.Tensor) -> dict[str, float]:
    """Additive statistics of the tokens an objective acts on (``Objective.selected``), all [B, T]:
    ``quadrant`` from ``quadrant_codes``, ``silenced`` S2T's set over the same mini-batch.
    The one function behind the trainer's ``select/*`` metrics and ``stapo analyze``'s table."""
    valid = valid.bool()
    sel = selected.bool() & valid
    s2t = silenced.bool() & valid
    out = {
        "sum/select/valid": float(valid.sum()),
        "sum/select/count": float(sel.sum()),
        "sum/select/non_positive": float((sel & (quadrant < 0)).sum()),
        "sum/select/s2t": float(s2t.sum()),
        "sum/select/overlap": float((sel & s2t).sum()),
    }
    for i, name in enumerate(QUADRANTS):
        out[f"sum/select/quadrant/{name}"] = float((sel & (quadrant == i)).sum())
    return out


def finalize_selection(sums: Mapping[str, float]) -> dict[str, float]:
    """``select/*`` metrics from reduced ``selection_sums`` (empty without them); see ``finalize``."""
    if "sum/select/count" not in sums:
        return {}
    count, s2t, overlap = sums["sum/select/count"], sums["sum/select/s2t"], sums["sum/select/overlap"]
    out = {"select/count": count, "select/non_positive/count": sums["sum/select/non_positive"],
           "select/s2t/count": s2t, "select/s2t_overlap/count": overlap}
    for name in QUADRANTS:
        out[f"select/quadrant/{name}/count"] = sums[f"sum/select/quadrant/{name}"]
    ratios = {"select/fraction": (count, sums["sum/select/valid"]),
              "select/s2t_overlap/of_selected": (overlap, count), "select/s2t_overlap/of_s2t": (overlap, s2t)}
    ratios.update({f"select/quadrant/{q}/fraction": (sums[f"sum/select/quadrant/{q}"], count) for q in QUADRANTS})
    out.update({k: num / den for k, (num, den) in ratios.items() if den > 0})
    return out


def _check_shapes(named: Mapping[str, torch.Tensor | None], like: torch.Tensor) -> None:
    for name, t in named.items():
        if t is not None and t.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(like.shape)}")


def token_fields(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: DiagnosticsConfig,
    *,
    silenced: torch.Tensor | None = None,
    p2logp: torch.Tensor | None = None,
) -> TokenFields:
    """Every per-token quantity the metrics and the rollout dumps need (see ``TokenFields``)."""
    _check_shapes(
        {"entropy": entropy, "collision": collision, "old_logprobs": old_logprobs,
         "response_mask": response_mask, "silenced": silenced, "p2logp": p2logp},
        logprobs,
    )
    valid = response_mask.bool()
    adv = expand_advantages(advantages, logprobs).detach().to(torch.float64)  # [B, T]
    lp = logprobs.detach().to(torch.float64)
    ent = entropy.detach().to(torch.float64)
    prob = lp.exp()
    positive = valid & (adv > 0)
    tau = cfg.entropy_threshold
    # −inf is s2t_threshold's "no candidate anywhere" value: S2T silences nothing (s2t_mask below
    # still gets −inf), while the quadrants fall back to the positive-token quantile of this batch
    if tau is None or not math.isfinite(tau):
        tau = diagnostic_entropy_threshold(
            [(logprobs, entropy, advantages, response_mask)], cfg.prob_threshold, cfg.entropy_quantile
        )
    if silenced is None:
        # the S2T mask with the same settings: what STAPO silences (or would have, under another objective)
        silenced = s2t_mask(logprobs, entropy, advantages, response_mask, cfg.prob_threshold,
                            cfg.entropy_quantile, cfg.entropy_threshold)
    silenced = silenced.bool() & valid
    quadrant = quadrant_codes(prob, ent, positive, cfg.prob_threshold, tau)
    weight = theory.surrogate_weight(logprobs, old_logprobs, advantages, clip_low=cfg.clip_low,
                                     clip_high=cfg.clip_high, clip_ratio_c=cfg.clip_ratio_c)
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    gsq = theory.logit_grad_norm_sq(weight, prob, collision)
    lower, upper = theory.grad_norm_sq_bounds(weight, prob, ent, cfg.vocab_size)
    log_ratio = (lp - old_logprobs.detach().to(torch.float64)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    dh_exact = None
    if p2logp is not None:
        dh_exact = theory.entropy_change_exact(lp, ent, collision, p2logp, adv)
    return TokenFields(
        valid=valid,
        positive=positive,
        prob=prob,
        advantage=adv,
        ratio=log_ratio.exp(),
        weight=weight,
        candidate=s2t_candidates(logprobs, advantages, response_mask, cfg.prob_threshold),
        silenced=silenced,
        quadrant=quadrant,
        grad_norm=gsq.sqrt(),
        grad_lower=lower,
        grad_upper=upper,
        grad_norm_sq=gsq,
        entropy_up_paper=theory.raises_entropy_paper(lp, ent),
        dh_natural=theory.entropy_change_natural(lp, ent, adv),
        dh_exact=dh_exact,
        entropy_threshold=float(tau),
    )


def _sum(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(torch.where(mask, x.to(torch.float64), torch.zeros((), dtype=torch.float64)).sum())


def _max(x: torch.Tensor, mask: torch.Tensor) -> float:
    # identity 0 is safe: every maximised quantity is a norm (≥ 0)
    return float(x[mask].max()) if bool(mask.any()) else 0.0


def sums_from_fields(f: TokenFields, entropy: torch.Tensor, selected: torch.Tensor | None = None) -> dict[str, float]:
    """The additive statistics of ``token_diagnostic_sums`` from precomputed ``TokenFields``."""
    pos = f.positive
    out = {
        "sum/valid": float(f.valid.sum()),
        "sum/pos": float(pos.sum()),
        "sum/entropy": _sum(entropy, f.valid),
        "sum/silenced": float(f.silenced.sum()),
        "sum/grad_sq/all": _sum(f.grad_norm_sq, f.valid),
        "sum/grad_sq/silenced": _sum(f.grad_norm_sq, f.silenced),
        "sum/grad_norm/all": _sum(f.grad_norm, f.valid),
        "sum/grad_norm/silenced": _sum(f.grad_norm, f.silenced),
        "sum/entropy_up_paper": float((f.entropy_up_paper & pos).sum()),
        # bounds on the bracket, so the tolerance does not scale with w²
        "sum/bound_violations": float(
            (f.valid & (f.weight != 0) & (
                (f.grad_norm_sq < f.grad_lower - BOUND_ATOL * f.weight**2)
                | (f.grad_norm_sq > f.grad_upper + BOUND_ATOL * f.weight**2)
            )).sum()
        ),
        "sum/tau": 0.0 if math.isnan(f.entropy_threshold) else f.entropy_threshold,
        "sum/tau_n": 0.0 if math.isnan(f.entropy_threshold) else 1.0,
    }
    if f.dh_exact is not None:
        out["sum/exact_n"] = float(pos.sum())
        out["sum/entropy_up_exact"] = float(((f.dh_exact > 0) & pos).sum())
    for i, name in enumerate(QUADRANTS):
        in_q = f.quadrant == i
        out[f"sum/quadrant/{name}"] = float(in_q.sum())
        out[f"sum/grad_norm/{name}"] = _sum(f.grad_norm, in_q)
        out[f"max/grad_norm/{name}"] = _max(f.grad_norm, in_q)
    if selected is not None:
        out.update(selection_sums(selected, f.valid, f.quadrant, f.silenced))
    return out


def token_diagnostic_sums(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    vocab_size: int,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    prob_threshold: float = TAU_P,
    entropy_threshold: float | None = None,
    entropy_quantile: float = QUANTILE,
    silenced: torch.Tensor | None = None,
    p2logp: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
) -> dict[str, float]:
    """Reducible statistics of one (micro-)batch: ``sum/*`` keys add up, ``max/*`` keys take the max.

    ``selected`` [B, T]: the tokens the training objective acts on (``MinibatchPlan.selected``), for
    the ``select/*`` metrics."""
    cfg = DiagnosticsConfig(vocab_size, prob_threshold, entropy_quantile, entropy_threshold,
                            clip_low, clip_high, clip_ratio_c)
    fields = token_fields(logprobs, entropy, collision, advantages, old_logprobs, response_mask, cfg,
                          silenced=silenced, p2logp=p2logp)
    return sums_from_fields(fields, entropy.detach(), selected)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """``diag/*`` metrics from reduced sums. Undefined values (empty denominators) are left out, not NaN.

    - diag/pos_tokens: valid tokens with A > 0 (the taxonomy's population)
    - diag/quadrant/<q>/{count,fraction}: fraction of positive tokens in quadrant q
    - diag/grad_norm/<q>/{mean,max}: exact ‖∇_z J‖ per positive token of q (w = ρA, 0 if clipped)
    - diag/entropy_up/{paper,exact}_fraction: positive tokens predicted to raise H, by p < e^{−H}
      (natural gradient) and by the exact first-order change of a plain gradient step
    - diag/silenced/{count,fraction}: S2T-silenced tokens, fraction of valid tokens
    - diag/silenced/grad_sq_share: Σ_silenced ‖∇_z J‖² / Σ_valid ‖∇_z J‖², i.e. the silenced share of
      the squared norm of the gradient w.r.t. all logits (positions are separate logits, so it adds up)
    - diag/silenced/grad_norm_share: the same with per-token norms ‖∇_z J‖
    - diag/entropy/mean, diag/entropy_threshold (τ_h used), diag/bounds/violations (should stay 0)
    - select/* (with ``selected``): the tokens the objective acts on (S2T's silenced, 20-Entropy's kept,
      Clip-Cov's detached, KL-Cov's penalised): select/{count,fraction} (of valid tokens),
      select/quadrant/<q>/{count,fraction} (of the selected), select/non_positive/count (A ≤ 0: no
      quadrant), select/s2t/count (S2T's set), select/s2t_overlap/{count,of_selected,of_s2t}
    """
    s = dict(sums)
    pos = s.get("sum/pos", 0.0)
    out: dict[str, float] = {"diag/pos_tokens": pos}

    def put(key, value):
        if value is not None:
            out[key] = float(value)

    for name in QUADRANTS:
        count = s.get(f"sum/quadrant/{name}", 0.0)
        out[f"diag/quadrant/{name}/count"] = count
        put(f"diag/quadrant/{name}/fraction", _ratio(count, pos))
        put(f"diag/grad_norm/{name}/mean", _ratio(s.get(f"sum/grad_norm/{name}", 0.0), count))
        if count > 0:
            out[f"diag/grad_norm/{name}/max"] = s[f"max/grad_norm/{name}"]
    put("diag/entropy_up/paper_fraction", _ratio(s.get("sum/entropy_up_paper", 0.0), pos))
    if "sum/exact_n" in s:
        put("diag/entropy_up/exact_fraction", _ratio(s["sum/entropy_up_exact"], s["sum/exact_n"]))
    out["diag/silenced/count"] = s.get("sum/silenced", 0.0)
    put("diag/silenced/fraction", _ratio(s.get("sum/silenced", 0.0), s.get("sum/valid", 0.0)))
    put("diag/silenced/grad_sq_share", _ratio(s.get("sum/grad_sq/silenced", 0.0), s.get("sum/grad_sq/all", 0.0)))
    put("diag/silenced/grad_norm_share",
        _ratio(s.get("sum/grad_norm/silenced", 0.0), s.get("sum/grad_norm/all", 0.0)))
    put("diag/entropy/mean", _ratio(s.get("sum/entropy", 0.0), s.get("sum/valid", 0.0)))
    put("diag/entropy_threshold", _ratio(s.get("sum/tau", 0.0), s.get("sum/tau_n", 0.0)))
    out["diag/bounds/violations"] = s.get("sum/bound_violations", 0.0)
    out.update(finalize_selection(s))
    return out


def token_diagnostics(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    vocab_size: int,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    prob_threshold: float = TAU_P,
    entropy_threshold: float | None = None,
    entropy_quantile: float = QUANTILE,
    silenced: torch.Tensor | None = None,
    p2logp: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
) -> dict[str, float]:
    """The ``diag/*`` (and, with ``selected``, ``select/*``) metrics of one step in one call (see ``finalize``).

    Shapes: logprobs, entropy, collision (Σπ²), old_logprobs, response_mask, silenced, p2logp
    (Σπ² log π, optional: enables ``diag/entropy_up/exact_fraction``), selected [B, T]; advantages [B] or [B, T].
    For micro-batched steps use ``DiagnosticsAccumulator`` instead.
    """
    return finalize(token_diagnostic_sums(
        logprobs, entropy, collision, advantages, old_logprobs, response_mask, vocab_size=vocab_size,
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, prob_threshold=prob_threshold,
        entropy_threshold=entropy_threshold, entropy_quantile=entropy_quantile, silenced=silenced,
        p2logp=p2logp, selected=selected,
    ))


class DiagnosticsAccumulator:
    """Adds up ``token_diagnostic_sums`` over micro-batches, reduces over ranks, then ``finalize``s.

        acc = DiagnosticsAccumulator()
        for mb in micro_batches:
            acc.add(lp, ent, coll, adv, old_lp, mask, vocab_size=V, entropy_threshold=tau, silenced=s)
        acc.all_reduce(sum_fn, max_fn)   # optional: 1-D float64 tensor -> reduced tensor (same order)
        metrics = acc.finalize()         # dict of diag/* floats
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, *args, **kwargs) -> dict[str, float]:
        """``token_diagnostic_sums(*args, **kwargs)``, accumulated; returns this micro-batch's sums."""
        sums = token_diagnostic_sums(*args, **kwargs)
        self.add_sums(sums)
        return sums

    def add_sums(self, sums: Mapping[str, float]) -> None:
        for key, value in sums.items():
            if key.startswith("sum/"):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
            elif key.startswith("max/"):
                self.sums[key] = max(self.sums.get(key, 0.0), float(value))
            else:
                raise KeyError(f"diagnostic statistic {key!r} is neither sum/* nor max/*")

    def all_reduce(
        self,
        sum_fn: Callable[[torch.Tensor], torch.Tensor],
        max_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Reduce across ranks. Every rank must have added the same kinds of statistics (same keys)."""
        keys = sorted(self.sums)
        for prefix, fn in (("sum/", sum_fn), ("max/", max_fn)):
            ks = [k for k in keys if k.startswith(prefix)]
            if not ks:
                continue
            reduced = fn(torch.tensor([self.sums[k] for k in ks], dtype=torch.float64))
            self.sums.update(zip(ks, (float(v) for v in reduced.tolist())))

    def finalize(self) -> dict[str, float]:
        return finalize(self.sums)

    def reset(self) -> None:
        self.sums = {}
