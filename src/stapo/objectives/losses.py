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

import functools

import torch

from .aggregate import agg_loss
from .configs import (
    CISPOConfig,
    ClipConfig,
    ClipCovConfig,
    DAPOConfig,
    DrGRPOConfig,
    Entropy20Config,
    GRPOConfig,
    GSPOConfig,
    JustRLConfig,
    KLCovConfig,
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
from .registry import TokenStats, register_objective

LOG_RATIO_CLAMP = 20.0  # keeps exp() finite for stale tokens (verl clamps the same way)


def clipped_surrogate(logprobs, old_logprobs, advantages, cfg: ClipConfig):
    """Per-token clipped loss [B, T] and the boolean maps of where each clip binds."""
    adv = expand_advantages(advantages, logprobs).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss, clips = clipped_ratio_loss(log_ratio, adv, cfg)
    return loss, clips, log_ratio


def clipped_ratio_loss(log_ratio, adv, cfg: ClipConfig):
    """The clipped loss [B, T] of a (token- or sequence-level) log-ratio, and where each clip binds."""
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
    return loss, {"high": clip_high, "low": clip_low, "dual": dual}


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    return (torch.where(mask, x.float(), torch.zeros((), dtype=torch.float32)).sum() / n).detach()


def _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, *, entropy, ref_logprobs,
                    denominator, loss_mask=None, surrogate=None):
    """Shared body: clipped surrogate (+ optional k3 KL), reduced over ``loss_mask``.

    ``surrogate(logprobs, old_logprobs, advantages, cfg, valid) -> (loss [B, T], clips, log_ratio)``
    replaces the token-level clipped surrogate (GSPO, CISPO, the covariance objectives).
    """
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
    if surrogate is None:
        pg, clips, log_ratio = clipped_surrogate(logprobs, old_logprobs, advantages, cfg)
    else:
        pg, clips, log_ratio = surrogate(logprobs, old_logprobs, advantages, cfg, valid)
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
    action="kept",
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
    action="silenced",
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


# --- GSPO and CISPO: other importance ratios, no token selection ---------------------------------

def _gspo_surrogate(logprobs, old_logprobs, advantages, cfg, valid):
    """GSPO Eq. 7: s_i = exp(mean_t log ρ_i,t) per sequence; each token carries sg[s_i]·π/sg[π],
    so the value is s_i and the gradient flows through its own log-prob (verl's form)."""
    adv = expand_advantages(advantages, logprobs).to(logprobs.dtype)
    token_log_ratio = logprobs - old_logprobs  # 0 at padding (the caller zeroed both there)
    seq_log_ratio = token_log_ratio.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)  # [B]
    log_s = (logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1))
    loss, clips = clipped_ratio_loss(log_s.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), adv, cfg)
    return loss, clips, token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@register_objective("gspo", GSPOConfig)
def gspo(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """GSPO (arXiv 2507.18071): the clipped surrogate of the length-normalised sequence ratio."""
    return _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, surrogate=_gspo_surrogate, **kw)


def _cispo_surrogate(logprobs, old_logprobs, advantages, cfg, valid):
    """CISPO: −sg(clip(ρ, 1 − ε_low, 1 + ε_high))·A·log π: the weight is clipped, no token's gradient is dropped."""
    adv = expand_advantages(advantages, logprobs).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high).detach()
    clips = {"high": ratio > 1.0 + cfg.clip_high, "low": ratio < 1.0 - cfg.clip_low, "dual": torch.zeros_like(valid)}
    return -weight * adv * logprobs, clips, log_ratio


@register_objective("cispo", CISPOConfig)
def cispo(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE with a clipped, stop-gradient IS weight."""
    return _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask, surrogate=_cispo_surrogate, **kw)


# --- Clip-Cov and KL-Cov: tokens chosen by Cov(log π, A), over the whole mini-batch ---------------
# Cov_t = (A_t − mean A)·(log π_t − mean log π), the means over the valid tokens of the selection
# scope (the optimizer mini-batch, or one micro-batch as verl), in float64, detached.

def _valid_values(stats, gather):
    """Every valid token's (A, log π) over the micro-batches and ranks, 1-D float64, in batch order."""
    adv = [expand_advantages(s.advantages, s.logprobs).detach().double()[s.response_mask.bool()] for s in stats]
    logp = [s.logprobs.detach().double()[s.response_mask.bool()] for s in stats]
    adv, logp = torch.cat(adv), torch.cat(logp)
    return (adv, logp) if gather is None else (gather(adv), gather(logp))


def _covariances(stats, gather):
    """(each micro-batch's Cov [B, T] float64, the number of valid tokens in the scope)."""
    adv, logp = _valid_values(stats, gather)
    n = adv.numel()
    mean_a, mean_l = (adv.mean(), logp.mean()) if n else (0.0, 0.0)
    covs = [(expand_advantages(s.advantages, s.logprobs).detach().double().to(s.logprobs.device) - mean_a)
            * (s.logprobs.detach().double() - mean_l) for s in stats]
    return covs, n


def _clip_binds(s: TokenStats, cfg):
    """Where the PPO clip already zeroes the gradient (verl's ``clip_by_origin``); ρ = 1 without old log-probs."""
    if s.old_logprobs is None:
        return torch.zeros_like(s.response_mask, dtype=torch.bool)
    adv = expand_advantages(s.advantages, s.logprobs).detach()
    ratio = torch.exp(s.logprobs.detach() - s.old_logprobs.detach())
    return (-adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)) > (-adv * ratio)


def _clip_cov_choose(cfg: ClipCovConfig, stats, gather):
    """Keep masks: valid tokens minus a uniformly random ``max(⌊r·N⌋, 1)`` of the candidates
    (clip not binding, ω_low < Cov < ω_high) of the whole scope.

    The choice draws one uniform priority per candidate from torch's default generator (seeded per
    rank by the run, saved in its checkpoints, so a resumed run draws the same) and detaches the
    candidates whose priority is among the lowest count over all ranks (gathered, as the S2T τ_h).
    """
    covs, n = _covariances(stats, gather)
    cands = [s.response_mask.bool() & ~_clip_binds(s, cfg) & (c > cfg.clip_cov_lb) & (c < cfg.clip_cov_ub)
             for s, c in zip(stats, covs)]
    count = max(int(cfg.clip_cov_ratio * n), 1)
    local = torch.rand(int(sum(int(c.sum()) for c in cands)), dtype=torch.float64)
    every = local if gather is None else gather(local)
    chosen = local <= every.kthvalue(count).values if every.numel() > count else torch.ones_like(local, dtype=torch.bool)
    keeps, start = [], 0
    for s, c in zip(stats, cands):
        detached = torch.zeros_like(c)
        detached[c] = chosen[start:start + int(c.sum())].to(c.device)
        start += int(c.sum())
        keeps.append(s.response_mask.bool() & ~detached)
    return keeps


def _kl_cov_choose(cfg: KLCovConfig, stats, gather):
    """Penalised tokens: the top ``max(⌊k·N⌋, 1)`` valid tokens by Cov over the whole scope: a cut on
    the gathered values, so the same tokens on every split (verl's topk breaks a tie by position)."""
    covs, n = _covariances(stats, gather)
    valid = [s.response_mask.bool() for s in stats]
    if n == 0:
        return valid
    local = torch.cat([c[v].cpu() for c, v in zip(covs, valid)])
    every = local if gather is None else gather(local)
    k = max(int(n * cfg.kl_cov_ratio), 1)
    cut = every.topk(k).values[-1]
    # a tie straddling the cut is left out (all-zero advantages: Cov = 0 everywhere, nothing penalised)
    above = (lambda c: c >= cut.to(c.device)) if int((every >= cut).sum()) <= k else (lambda c: c > cut.to(c.device))
    return [v & above(c) for c, v in zip(covs, valid)]


def _scoped(choose):
    """The planner's ``select``: over the whole mini-batch, or per micro-batch (as verl)."""
    def select(cfg, stats, gather):
        if cfg.selection_scope == "microbatch":
            return [choose(cfg, [s], None)[0] for s in stats]
        return choose(cfg, stats, gather)
    return select


def _one_batch(choose):
    """The ``keep_mask`` hook: the selection on one batch on its own (ρ = 1: no old log-probs here)."""
    return lambda cfg, logprobs, entropy, advantages, response_mask: choose(
        cfg, [TokenStats(logprobs, entropy, advantages, response_mask)], None)[0]


def _all_valid(cfg, keep, response_mask):
    return response_mask.bool()


def _detached_surrogate(keep, logprobs, old_logprobs, advantages, cfg, valid):
    loss, clips, log_ratio = clipped_surrogate(logprobs, old_logprobs, advantages, cfg)
    # where, not a product: the detached tokens get an exact zero gradient
    return torch.where(keep, loss, torch.zeros((), dtype=loss.dtype)), clips, log_ratio


@register_objective("clip_cov", ClipCovConfig, keep_mask=_one_batch(_clip_cov_choose), select=_scoped(_clip_cov_choose),
                    denominator_mask=_all_valid, policy_statistics=True, action="detached")
def clip_cov(cfg, logprobs, old_logprobs, advantages, response_mask, *, keep_mask=None, **kw):
    """Clip-Cov (arXiv 2505.22617): the clipped surrogate with a few high-covariance tokens' gradient
    detached; normalised over all valid tokens (verl). ``keep_mask``: the tokens that keep their
    gradient, from the planner; None = chosen on this batch alone (verl's per-micro-batch choice)."""
    if keep_mask is None:
        stats = TokenStats(logprobs, None, advantages, response_mask, None, old_logprobs)
        keep_mask = _clip_cov_choose(cfg, [stats], None)[0]
    valid = response_mask.bool()
    loss, metrics = _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask,
                                    surrogate=functools.partial(_detached_surrogate, keep_mask), **kw)
    metrics["clip_cov/detached"] = (valid & ~keep_mask).sum().detach().float()
    metrics["clip_cov/detached_fraction"] = _masked_mean(~keep_mask, valid)
    return loss, metrics


def _kl_cov_surrogate(penalised, logprobs, old_logprobs, advantages, cfg, valid):
    """verl's kl_cov: the unclipped −A·ρ, plus β·|log ρ| on the penalised tokens."""
    adv = expand_advantages(advantages, logprobs).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss = -adv * torch.exp(log_ratio)
    loss = torch.where(penalised, loss + cfg.ppo_kl_coef * log_ratio.abs(), loss)
    none = torch.zeros_like(valid)
    return loss, {"high": none, "low": none, "dual": none}, log_ratio


@register_objective("kl_cov", KLCovConfig, keep_mask=_one_batch(_kl_cov_choose), select=_scoped(_kl_cov_choose),
                    denominator_mask=_all_valid, policy_statistics=True, action="penalised")
def kl_cov(cfg, logprobs, old_logprobs, advantages, response_mask, *, keep_mask=None, **kw):
    """KL-Cov (arXiv 2505.22617): −A·ρ with β·|log π − log π_old| on the top-covariance tokens.
    ``keep_mask``: those penalised tokens, from the planner; None = chosen on this batch alone (verl)."""
    if keep_mask is None:
        keep_mask = _kl_cov_choose(cfg, [TokenStats(logprobs, None, advantages, response_mask)], None)[0]
    valid = response_mask.bool()
    loss, metrics = _clip_objective(cfg, logprobs, old_logprobs, advantages, response_mask,
                                    surrogate=functools.partial(_kl_cov_surrogate, keep_mask & valid), **kw)
    metrics["kl_cov/penalised"] = (valid & keep_mask).sum().detach().float()
    metrics["kl_cov/penalised_fraction"] = _masked_mean(keep_mask, valid)
    return loss, metrics
