"""The objective zoo: each a short pure function of tensors, registered by name.

Notation (shapes): B sequences, T response tokens.
    logprobs, old_logprobs, ref_logprobs, entropy, response_mask  [B, T]
    advantages                                                    [B] or [B, T]
    ρ = exp(logprobs − old_logprobs)                              [B, T]

Clipped surrogate (PPO; clip-higher from DAPO; dual clip from Ye et al. 2020, as verl):
    l = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)          for A ≥ 0
    l = min(−min(ρA, clip(ρ, ...)A), −cA)              for A < 0 when clip_ratio_c = c
"""

from __future__ import annotations

import torch

from .aggregate import agg_loss
from .configs import (
    ClipConfig,
    DAPOConfig,
    DrGRPOConfig,
    Entropy20Config,
    GRPOConfig,
    JustRLConfig,
    STAPOConfig,
)
from .masks import (
    expand_advantages,
    high_entropy_mask,
    high_entropy_threshold,
    s2t_candidates,
    s2t_mask,
    s2t_silence,
    s2t_threshold,
)
from .registry import register_objective

LOG_RATIO_CLAMP = 20.0  # keeps exp() finite for stale tokens (verl clamps the same way)


def clipped_surrogate(logprobs, old_logprobs, advantages, cfg: ClipConfig):
    """Per-token clipped loss [B, T] and the boolean maps of where each clip binds."""
    adv = expand_advantages(advantages, logprobs).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_high = (adv > 0) & (ratio > 1.0 + cfg.clip_high)
    clip_low = (adv < 0) & (ratio < 1.0 - cfg.clip_low)
    dual = torch.zeros_like(clip_high)
    if cfg.clip_ratio_c is not None:
        dual_bound = -adv * cfg.clip_ratio_c
        dual = (adv < 0) & (loss > dual_bound)
        loss = torch.where(adv < 0, torch.minimum(loss, dual_bound), loss)
    return loss, {"high": clip_high, "low": clip_low, "dual": dual}, log_ratio


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    return (torch.where(mask, x.float(), torch.zeros((), dtype=torch.float32)).sum() / n).detach()


def _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, *, entropy, ref_logprobs,
                    denominator, loss_mask=None):
    """Shared body: clipped surrogate (+ optional k3 KL), reduced over ``loss_mask``."""
    valid = response_mask.bool()
    loss_mask = valid if loss_mask is None else loss_mask
    # Padded positions may hold garbage (-inf, NaN) in any input. Masking only the output is not
    # enough: backward multiplies the zero upstream grad by e.g. a NaN advantage and gets NaN.
    # torch.where's backward sends an exact 0 to the unselected branch, so swap the garbage out here.
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(valid, logprobs, zero)
    old_logprobs = torch.where(valid, old_logprobs, zero)
    advantages = torch.where(valid, expand_advantages(advantages, logprobs).to(logprobs.dtype), zero)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(valid, ref_logprobs, zero)
    pg, clips, log_ratio = clipped_surrogate(logprobs, old_logprobs, advantages, cfg)
    metrics = {f"actor/clip_frac_{k}": _masked_mean(v, valid) for k, v in clips.items()}
    # k3 estimator of KL(old || current) on the sampled tokens
    metrics["actor/approx_kl"] = _masked_mean(torch.expm1(-log_ratio) + log_ratio, valid)
    if entropy is not None:
        metrics["actor/entropy"] = _masked_mean(entropy, valid)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs `ref_logprobs` [B, T] from a reference model")
        d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.expm1(d) - d  # k3: exp(d) − d − 1 ≥ 0, unbiased for KL(π || π_ref)
        metrics["actor/kl_ref"] = _masked_mean(kl, valid)
        pg = pg + cfg.kl_coef * kl
    pg = torch.where(loss_mask, pg, torch.zeros((), dtype=pg.dtype))
    loss = agg_loss(pg, loss_mask, cfg.loss_agg_mode, denominator=denominator, norm_length=cfg.norm_length)
    metrics["loss/policy"] = loss.detach()
    return loss, metrics


@register_objective("grpo", GRPOConfig)
def grpo(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """GRPO (DeepSeekMath): symmetric ε = 0.2, per-sequence token mean, optional k3 KL (β = kl_coef)."""
    return _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, **kw)


@register_objective("dapo", DAPOConfig)
def dapo(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """DAPO: clip-higher (0.2 / 0.28) and token-level mean over the batch."""
    return _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, **kw)


@register_objective("dr_grpo", DrGRPOConfig)
def dr_grpo(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """Dr. GRPO: token sums divided by a constant length, so long answers are not favoured."""
    return _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, **kw)


@register_objective("justrl", JustRLConfig)
def justrl(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """JustRL: single-stage GRPO, clip-higher 0.2 / 0.28, dual clip 10, token-mean, no KL."""
    return _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, **kw)


# --- 20-Entropy: gradients only on the top-ρ entropy tokens of the mini-batch -----------------

def _entropy20_kept(cfg: Entropy20Config, logprobs, entropy, advantages, response_mask):
    return high_entropy_mask(entropy, response_mask, cfg.top_ratio, cfg.entropy_threshold)


def _entropy20_denominator(cfg: Entropy20Config, kept, response_mask):
    return kept if cfg.normalize_by == "selected" else response_mask.bool()


def _entropy20_overrides(cfg, stats, gather):
    pairs = [(s.entropy, s.response_mask) for s in stats]
    return {"entropy_threshold": high_entropy_threshold(pairs, cfg.top_ratio, gather)}


@register_objective(
    "entropy20",
    Entropy20Config,
    needs_entropy=True,
    keep_mask=_entropy20_kept,
    denominator_mask=_entropy20_denominator,
    minibatch_overrides=_entropy20_overrides,
    policy_statistics=True,
)
def entropy20(cfg, logprobs, old_logprobs, advantages, response_mask, *, entropy, keep_mask=None, **kw):
    """Beyond the 80/20 rule: the `justrl` loss on the top ``top_ratio`` tokens by entropy only.

    ``keep_mask``: the kept tokens when the caller has computed them (once per micro-batch).
    """
    kept = _entropy20_kept(cfg, logprobs, entropy, advantages, response_mask) if keep_mask is None else keep_mask
    if cfg.normalize_by == "selected":
        loss, metrics = _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask,
                                        entropy=entropy, loss_mask=kept, **kw)
    else:
        # numerator restricted to kept tokens, denominator over all valid tokens
        adv = torch.where(kept, expand_advantages(advantages, logprobs), 0.0)
        loss, metrics = _clip_objective(cfg, logprobs, old_logprobs, adv, response_mask, entropy=entropy, **kw)
    metrics["entropy20/kept_fraction"] = _masked_mean(kept, response_mask)
    return loss, metrics


# --- STAPO: the justrl objective with the S2T mask, renormalised over kept tokens ---------------

def _stapo_kept(cfg: STAPOConfig, logprobs, entropy, advantages, response_mask):
    silenced = s2t_mask(logprobs, entropy, advantages, response_mask, cfg.prob_threshold,
                        cfg.entropy_quantile, cfg.entropy_threshold)
    return response_mask.bool() & ~silenced


def _stapo_overrides(cfg, stats, gather):
    quads = [(s.logprobs, s.entropy, s.advantages, s.response_mask) for s in stats]
    return {"entropy_threshold": s2t_threshold(quads, cfg.prob_threshold, cfg.entropy_quantile, gather)}


@register_objective(
    "stapo",
    STAPOConfig,
    needs_entropy=True,
    keep_mask=_stapo_kept,
    minibatch_overrides=_stapo_overrides,
    policy_statistics=True,
)
def stapo(cfg, logprobs, old_logprobs, advantages, response_mask, *, entropy, keep_mask=None, **kw):
    """STAPO (arXiv 2602.15620): `justrl` × S2T keep-mask, token-mean over valid, unsilenced tokens.

    ``keep_mask``: the S2T keep-mask when the caller has computed it (once per micro-batch, from
    the statistics it chose); the S2T metrics then describe that mask, and ``s2t/candidates``
    counts the candidates under ``logprobs``.
    """
    valid = response_mask.bool()
    # s2t_mask in two steps, so the candidates and τ_h reported below are computed once
    cand = s2t_candidates(logprobs, advantages, response_mask, cfg.prob_threshold)
    if keep_mask is None:
        silenced, tau = s2t_silence(cand, entropy, cfg.entropy_quantile, cfg.entropy_threshold)
        keep = valid & ~silenced
    else:
        keep = valid & keep_mask
        silenced, tau = valid & ~keep, cfg.entropy_threshold
        tau = float("nan") if tau is None else tau
    loss, metrics = _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask,
                                    entropy=entropy, loss_mask=keep, **kw)
    metrics["s2t/masked_fraction"] = _masked_mean(silenced, response_mask)
    metrics["s2t/candidates"] = cand.sum().detach().float()
    metrics["s2t/silenced"] = silenced.sum().detach().float()
    metrics["s2t/entropy_threshold"] = torch.tensor(tau if tau != float("-inf") else float("nan"))
    return loss, metrics
