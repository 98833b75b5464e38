"""Plain float64 re-implementations of stapo's objectives, written from the specification (issue 2).

Nothing here calls the library: values come in as Python lists (``tensor.tolist()`` is exact for
float64) and the maths is done with Python floats and loops. Each objective returns the loss *and*
its gradient w.r.t. ``logprobs``, worked out by hand rather than by autograd:

    ρ = exp(logπ − logπ_old)
    l = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A)       ∂l/∂logπ = −Aρ where the unclipped term is the
                                                      min (ρ inside the clip range, or on the side the
                                                      clip does not guard), 0 where the clip binds
    dual clip (A < 0):  l ← min(l, −cA)               ∂l/∂logπ = 0 where −cA binds
    k3 KL:  k = e^d − d − 1,  d = logπ_ref − logπ     ∂k/∂logπ = 1 − e^d

The scalar loss is Σ_{b,t} w_bt · l_bt, with w the aggregation weight of each verl mode, so the
gradient is simply w_bt · ∂l_bt/∂logπ_bt.

Shapes (as nested lists): logprobs etc. [B][T]; advantages [B] or [B][T].
"""

from __future__ import annotations

import math

import torch

# Paper defaults, restated from the issue (not read from the library's dataclasses).
BASE = {"clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": None, "loss_agg_mode": "token-mean",
        "kl_coef": 0.0, "norm_length": None}
JUSTRL = {"clip_high": 0.28, "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean"}
DEFAULTS = {
    "grpo": {"loss_agg_mode": "seq-mean-token-mean"},
    "dapo": {"clip_high": 0.28, "loss_agg_mode": "token-mean"},
    "dr_grpo": {"loss_agg_mode": "seq-mean-token-sum-norm"},
    "justrl": JUSTRL,
    "entropy20": dict(JUSTRL, top_ratio=0.2, normalize_by="selected", entropy_threshold=None),
    "stapo": dict(JUSTRL, prob_threshold=0.002, entropy_quantile=0.75, entropy_threshold=None),
}


def as_lists(t):
    return None if t is None else t.detach().to(torch.float64).tolist()


def per_token(adv, B, T):
    """[B] or [B][T] advantages -> [B][T]."""
    if adv and not isinstance(adv[0], list):
        return [[adv[b]] * T for b in range(B)]
    return adv


def quantile_linear(values, q):
    """torch.quantile's default ('linear'): v[lo] + (pos − lo)(v[lo+1] − v[lo]), pos = q(n − 1)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def s2t(logprobs, entropy, adv, mask, prob_threshold=0.002, entropy_quantile=0.75, entropy_threshold=None):
    """STAPO S2T: (silenced [B][T], candidates [B][T], τ_h or None)."""
    B, T = len(mask), len(mask[0]) if mask else 0
    A = per_token(adv, B, T)
    cand = [[bool(mask[b][t]) and A[b][t] > 0 and math.exp(logprobs[b][t]) < prob_threshold
             for t in range(T)] for b in range(B)]
    tau = entropy_threshold
    if tau is None:
        pool = [entropy[b][t] for b in range(B) for t in range(T) if cand[b][t]]
        tau = quantile_linear(pool, entropy_quantile) if pool else None
    silenced = [[cand[b][t] and tau is not None and entropy[b][t] < tau for t in range(T)] for b in range(B)]
    return silenced, cand, tau


def high_entropy(entropy, mask, top_ratio=0.2, entropy_threshold=None):
    """20-Entropy: (kept [B][T], cut). Kept = valid tokens with entropy ≥ the (1 − ρ) quantile."""
    B, T = len(mask), len(mask[0]) if mask else 0
    tau = entropy_threshold
    if tau is None:
        pool = [entropy[b][t] for b in range(B) for t in range(T) if mask[b][t]]
        tau = quantile_linear(pool, 1.0 - top_ratio) if pool else math.inf
    return [[bool(mask[b][t]) and entropy[b][t] >= tau for t in range(T)] for b in range(B)], tau


def token_terms(lp, old, a, clip_low, clip_high, clip_ratio_c):
    """One token: (loss, ∂loss/∂logπ, clip_high?, clip_low?, dual?)."""
    rho = math.exp(lp - old)
    unclipped = -a * rho
    clipped = -a * min(max(rho, 1.0 - clip_low), 1.0 + clip_high)
    loss = max(unclipped, clipped)
    grad = -a * rho if unclipped >= clipped else 0.0
    high = a > 0 and rho > 1.0 + clip_high
    low = a < 0 and rho < 1.0 - clip_low
    dual = False
    if clip_ratio_c is not None and a < 0 and loss > -clip_ratio_c * a:
        loss, grad, dual = -clip_ratio_c * a, 0.0, True
    return loss, grad, high, low, dual


def agg_weights(mask, mode, denominator=None, norm_length=None):
    """w_bt of verl's agg_loss modes (rows with no unit in ``mask`` count for nothing)."""
    B, T = len(mask), len(mask[0]) if mask else 0
    lengths = [sum(1 for t in range(T) if mask[b][t]) for b in range(B)]
    if mode == "token-mean":
        n = sum(lengths) if denominator is None else denominator
        return [[1.0 / n if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    seqs = sum(1 for n in lengths if n) if denominator is None else denominator
    if not any(lengths):  # nothing in the loss: all weights 0 (the loss is 0, never 0/0)
        return [[0.0] * T for _ in range(B)]
    weights = []
    for b in range(B):
        if mode == "seq-mean-token-mean":
            w = 1.0 / (lengths[b] * seqs) if lengths[b] else 0.0
        elif mode == "seq-mean-token-sum":
            w = 1.0 / seqs
        elif mode == "seq-mean-token-sum-norm":
            w = 1.0 / ((T if norm_length is None else norm_length) * seqs)
        else:
            raise ValueError(mode)
        weights.append([w if mask[b][t] else 0.0 for t in range(T)])
    return weights


def agg(loss, mask, mode, denominator=None, norm_length=None):
    w = agg_weights(mask, mode, denominator, norm_length)
    return sum(w[b][t] * loss[b][t] for b in range(len(mask)) for t in range(len(mask[b])) if mask[b][t])


def _mean_over(values, mask):
    picked = [v for row_v, row_m in zip(values, mask) for v, m in zip(row_v, row_m) if m]
    return sum(picked) / len(picked) if picked else 0.0


def objective(name, logprobs, old_logprobs, advantages, response_mask, *, entropy=None, ref_logprobs=None,
              denominator=None, **overrides):
    """Reference ``policy_loss``. Inputs are torch tensors (converted to float64 lists here).

    Returns (loss: float, grad wrt logprobs: [B][T] floats, metrics: dict of floats).
    """
    cfg = {**BASE, **DEFAULTS[name], **overrides}
    lp, old, ent, ref = (as_lists(x) for x in (logprobs, old_logprobs, entropy, ref_logprobs))
    mask = response_mask.bool().tolist()
    B, T = len(mask), len(mask[0]) if mask else 0
    A = per_token(as_lists(advantages), B, T)
    metrics = {}
    loss_mask = mask
    if name == "entropy20":
        kept, _ = high_entropy(ent, mask, cfg["top_ratio"], cfg["entropy_threshold"])
        if cfg["normalize_by"] == "selected":
            loss_mask = kept
        else:  # the paper's formula: kept tokens' losses over all valid tokens
            A = [[A[b][t] if kept[b][t] else 0.0 for t in range(T)] for b in range(B)]
        metrics["entropy20/kept_fraction"] = _mean_over([[float(k) for k in r] for r in kept], mask)
    elif name == "stapo":
        silenced, cand, tau = s2t(lp, ent, A, mask, cfg["prob_threshold"], cfg["entropy_quantile"],
                                  cfg["entropy_threshold"])
        loss_mask = [[mask[b][t] and not silenced[b][t] for t in range(T)] for b in range(B)]
        metrics["s2t/masked_fraction"] = _mean_over([[float(s) for s in r] for r in silenced], mask)
        metrics["s2t/candidates"] = float(sum(map(sum, cand)))
        metrics["s2t/silenced"] = float(sum(map(sum, silenced)))
        metrics["s2t/entropy_threshold"] = math.nan if tau is None or tau == -math.inf else tau

    loss_tok = [[0.0] * T for _ in range(B)]
    dloss = [[0.0] * T for _ in range(B)]
    flags = {k: [[0.0] * T for _ in range(B)] for k in ("high", "low", "dual")}
    kl_tok = [[0.0] * T for _ in range(B)]
    approx = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            l, g, hi, lo, du = token_terms(lp[b][t], old[b][t], A[b][t], cfg["clip_low"], cfg["clip_high"],
                                           cfg["clip_ratio_c"])
            if cfg["kl_coef"] > 0:
                d = ref[b][t] - lp[b][t]
                kl_tok[b][t] = math.exp(d) - d - 1.0
                l += cfg["kl_coef"] * kl_tok[b][t]
                g += cfg["kl_coef"] * (1.0 - math.exp(d))
            loss_tok[b][t], dloss[b][t] = l, g
            flags["high"][b][t], flags["low"][b][t], flags["dual"][b][t] = float(hi), float(lo), float(du)
            d_old = old[b][t] - lp[b][t]
            approx[b][t] = math.exp(d_old) - d_old - 1.0  # k3 with samples from π_old
    w = agg_weights(loss_mask, cfg["loss_agg_mode"], denominator, cfg["norm_length"])
    loss = sum(w[b][t] * loss_tok[b][t] for b in range(B) for t in range(T) if loss_mask[b][t])
    grad = [[w[b][t] * dloss[b][t] if loss_mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    for k, v in flags.items():
        metrics[f"actor/clip_frac_{k}"] = _mean_over(v, mask)
    metrics["actor/approx_kl"] = _mean_over(approx, mask)
    if ent is not None:
        metrics["actor/entropy"] = _mean_over(ent, mask)
    if cfg["kl_coef"] > 0:
        metrics["actor/kl_ref"] = _mean_over(kl_tok, mask)
    metrics["loss/policy"] = loss
    return loss, grad, metrics


def group_advantages(rewards, group_size, method, eps=1e-6):
    """One loop per group, Python floats."""
    out = []
    for start in range(0, len(rewards), group_size):
        g = [float(r) for r in rewards[start:start + group_size]]
        n = len(g)
        mean = sum(g) / n
        if all(r == g[0] for r in g):
            out += [0.0] * n
        elif method == "grpo":
            std = math.sqrt(sum((r - mean) ** 2 for r in g) / (n - 1))  # Bessel's correction
            out += [(r - mean) / (std + eps) for r in g]
        elif method == "dr_grpo":
            out += [r - mean for r in g]
        elif method == "rloo":
            out += [g[i] - sum(g[j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
        else:
            raise ValueError(method)
    return out


# --- random inputs -------------------------------------------------------------------------------

def random_batch(seed, B, T, *, dtype=torch.float64, ratio_scale=1.0, token_adv=False, layout="right",
                 entropy_grid=None, with_ref=False):
    """A batch of plausible tensors from ``seed``.

    logprobs ~ U(−9, −0.01) so about a third of tokens have p < 0.002 (S2T candidates);
    log ρ ~ N(0, ratio_scale²) (scale 2 reaches the dual clip at ρ > 10); advantages ~ N(0, 1)
    with a fifth exactly 0; entropy ~ U(0, 3), rounded to ``entropy_grid`` to force ties.
    ``layout``: "right" / "left" padding with random lengths (0 allowed: empty rows), or
    "holes" (a random mask).
    """
    g = torch.Generator().manual_seed(seed)
    lp = -0.01 - 8.99 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = lp - ratio_scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    shape = (B, T) if token_adv else (B,)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64)
    adv = torch.where(torch.rand(*shape, generator=g) < 0.2, torch.zeros((), dtype=adv.dtype), adv)
    ent = 3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    if entropy_grid:
        ent = (ent / entropy_grid).round() * entropy_grid
    if layout == "holes":
        mask = torch.rand(B, T, generator=g) < 0.7
    else:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        pos = torch.arange(T).expand(B, T)
        mask = pos < lengths[:, None] if layout == "right" else pos >= (T - lengths)[:, None]
    batch = {"logprobs": lp, "old_logprobs": old, "advantages": adv, "response_mask": mask, "entropy": ent}
    if with_ref:
        batch["ref_logprobs"] = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
