"""Float64 references of GSPO, CISPO, Clip-Cov and KL-Cov: Python floats, one loop per token.

Written from the papers' formulas (and verl 0.9.1's core_algos where it fixes a detail), not
from stapo's code. Each returns (loss, ∂loss/∂logπ [B][T], extra) like ``float64_reference.objective``;
the token selection of the covariance objectives is a separate function so a test can check it.
"""

from __future__ import annotations

import math

from float64_reference import agg_weights, as_lists, per_token, token_terms


def _inputs(logprobs, old_logprobs, advantages, response_mask):
    lp, old = as_lists(logprobs), as_lists(old_logprobs)
    mask = response_mask.bool().tolist()
    B, T = len(mask), len(mask[0])
    return lp, old, per_token(as_lists(advantages), B, T), mask, B, T


def _reduce(loss_tok, grad_tok, mask, mode, denominator=None):
    w = agg_weights(mask, mode, denominator)
    B, T = len(mask), len(mask[0])
    loss = sum(w[b][t] * loss_tok[b][t] for b in range(B) for t in range(T) if mask[b][t])
    return loss, [[w[b][t] * grad_tok[b][t] if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]


def gspo(logprobs, old_logprobs, advantages, response_mask, clip_low=3e-4, clip_high=4e-4,
         loss_agg_mode="seq-mean-token-mean"):
    """GSPO Eq. 5-7: s_i = (π/π_old)^(1/|y_i|); a token's value is clip-PPO at s_i, its gradient s_i·∂logπ."""
    lp, old, A, mask, B, T = _inputs(logprobs, old_logprobs, advantages, response_mask)
    loss_tok, grad_tok = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = sum(mask[b])
        log_s = sum(lp[b][t] - old[b][t] for t in range(T) if mask[b][t]) / max(n, 1)
        for t in range(T):
            if mask[b][t]:
                # ∂s_i,t/∂logπ_t = s_i: the token-level terms at log-ratio log s_i
                loss_tok[b][t], grad_tok[b][t], *_ = token_terms(log_s, 0.0, A[b][t], clip_low, clip_high, None)
    return _reduce(loss_tok, grad_tok, mask, loss_agg_mode)


def cispo(logprobs, old_logprobs, advantages, response_mask, clip_low=1.0, clip_high=4.0):
    """MiniMax-M1 Eq. 3-4: −sg(clip(ρ))·A·logπ, token-mean."""
    lp, old, A, mask, B, T = _inputs(logprobs, old_logprobs, advantages, response_mask)
    loss_tok, grad_tok = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                w = min(max(math.exp(lp[b][t] - old[b][t]), 1.0 - clip_low), 1.0 + clip_high)
                loss_tok[b][t], grad_tok[b][t] = -w * A[b][t] * lp[b][t], -w * A[b][t]
    return _reduce(loss_tok, grad_tok, mask, "token-mean")


def covariances(logprobs, advantages, response_mask):
    """Cov_t = (A_t − mean A)(logπ_t − mean logπ) over the valid tokens; None at padding."""
    lp, _, A, mask, B, T = _inputs(logprobs, logprobs, advantages, response_mask)
    cells = [(b, t) for b in range(B) for t in range(T) if mask[b][t]]
    mean_a = sum(A[b][t] for b, t in cells) / len(cells)
    mean_l = sum(lp[b][t] for b, t in cells) / len(cells)
    return [[(A[b][t] - mean_a) * (lp[b][t] - mean_l) if mask[b][t] else None for t in range(T)] for b in range(B)]


def clip_cov_candidates(logprobs, old_logprobs, advantages, response_mask, clip_low=0.2, clip_high=0.2,
                        lb=1.0, ub=5.0, ratio=2e-4):
    """(the set of (b, t) Clip-Cov may detach, how many it detaches): lb < Cov < ub where the clip
    does not bind; max(⌊r·N⌋, 1) of them."""
    lp, old, A, mask, B, T = _inputs(logprobs, old_logprobs, advantages, response_mask)
    cov = covariances(logprobs, advantages, response_mask)
    cands = set()
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            rho = math.exp(lp[b][t] - old[b][t])
            binds = (A[b][t] > 0 and rho > 1 + clip_high) or (A[b][t] < 0 and rho < 1 - clip_low)
            if not binds and lb < cov[b][t] < ub:
                cands.add((b, t))
    return cands, max(int(ratio * sum(map(sum, mask))), 1)


def clip_cov(logprobs, old_logprobs, advantages, response_mask, detached, clip_low=0.2, clip_high=0.2):
    """Clip-PPO with the ``detached`` (b, t) tokens' terms zeroed; token-mean over every valid token."""
    lp, old, A, mask, B, T = _inputs(logprobs, old_logprobs, advantages, response_mask)
    loss_tok, grad_tok = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t] and (b, t) not in detached:
                loss_tok[b][t], grad_tok[b][t], *_ = token_terms(lp[b][t], old[b][t], A[b][t], clip_low, clip_high,
                                                                 None)
    return _reduce(loss_tok, grad_tok, mask, "token-mean")


def kl_cov_penalised(logprobs, advantages, response_mask, ratio=2e-4):
    """The top max(⌊k·N⌋, 1) valid tokens by Cov (distinct values assumed)."""
    cov = covariances(logprobs, advantages, response_mask)
    cells = sorted(((c, (b, t)) for b, row in enumerate(cov) for t, c in enumerate(row) if c is not None),
                   reverse=True)
    return {cell for _, cell in cells[:max(int(ratio * len(cells)), 1)]}


def kl_cov(logprobs, old_logprobs, advantages, response_mask, penalised, coef=0.1):
    """−A·ρ on every valid token plus coef·|log ρ| on the ``penalised`` ones; token-mean."""
    lp, old, A, mask, B, T = _inputs(logprobs, old_logprobs, advantages, response_mask)
    loss_tok, grad_tok = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                d = lp[b][t] - old[b][t]
                loss_tok[b][t], grad_tok[b][t] = -A[b][t] * math.exp(d), -A[b][t] * math.exp(d)
                if (b, t) in penalised:
                    loss_tok[b][t] += coef * abs(d)
                    grad_tok[b][t] += coef * math.copysign(1.0, d)
    return _reduce(loss_tok, grad_tok, mask, "token-mean")
