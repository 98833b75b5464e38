"""S2T (STAPO) and 20-Entropy masks: hand-worked cases, a float64 reference, micro-batch invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import float64_reference as ref
from stapo.objectives import (
    high_entropy_mask,
    high_entropy_threshold,
    masks,
    quantile,
    s2t_candidates,
    s2t_mask,
    s2t_threshold,
)

LOW = -7.0  # p = e^-7 ≈ 0.00091 < τ_p = 0.002: a candidate when A > 0
HIGH = -1.0  # p = e^-1 ≈ 0.37: never a candidate


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# --- S2T, worked by hand ------------------------------------------------------------------------------

def test_s2t_hand_worked():
    # Row 0 (A = +1): four low-p tokens with entropies 0.5, 1.0, 2.0, 3.0, then one high-p token with
    # low entropy 0.1 (not a candidate: p ≥ τ_p), then a padded low-p token with entropy 0.0.
    # Row 1 (A = −1): a low-p, low-entropy token, not a candidate (A ≤ 0).
    # Row 2 (A = 0):  likewise (A must be strictly positive).
    # Candidates' entropies: [0.5, 1.0, 2.0, 3.0]; q = 0.75 -> position 0.75·3 = 2.25
    #   τ_h = 2.0 + 0.25·(3.0 − 2.0) = 2.25  -> silenced: 0.5, 1.0, 2.0 (< 2.25); 3.0 stays.
    # Had the padded token counted, the pool would be [0, .5, 1, 2, 3]: τ_h = 2.0 and 2.0 would stay.
    lp = t([[LOW, LOW, LOW, LOW, HIGH, LOW], [LOW] * 6, [LOW] * 6])
    ent = t([[0.5, 1.0, 2.0, 3.0, 0.1, 0.0], [0.1] * 6, [0.1] * 6])
    adv = t([1.0, -1.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1] * 6], dtype=torch.bool)
    silenced = s2t_mask(lp, ent, adv, mask)
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, :3] = True
    assert torch.equal(silenced, expected)
    assert s2t_candidates(lp, adv, mask).sum() == 4
    assert s2t_threshold([(lp, ent, adv, mask)]) == pytest.approx(2.25, abs=1e-15)


def test_s2t_pools_candidates_across_rows_and_token_advantages():
    # Token-level advantages: only tokens with their own A > 0 are candidates.
    # Candidates (row, entropy): (0, 1.0), (1, 3.0), (1, 2.0); (0, t1) has A < 0.
    # q = 0.5 of [1, 2, 3] -> position 1 -> τ_h = 2.0 exactly; silenced: entropy 1.0 only.
    lp = t([[LOW, LOW], [LOW, LOW]])
    ent = t([[1.0, 0.2], [3.0, 2.0]])
    adv = t([[0.5, -0.5], [0.1, 2.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    silenced = s2t_mask(lp, ent, adv, mask, entropy_quantile=0.5)
    assert torch.equal(silenced, torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize(
    "entropies,q,tau,silenced",
    [
        # ties below τ_h: [1, 1, 1, 2], q = .75 -> position 2.25 -> 1 + .25·(2 − 1) = 1.25: the three 1s go
        ([1.0, 1.0, 1.0, 2.0], 0.75, 1.25, [True, True, True, False]),
        # ties *at* τ_h: [1, 2, 2, 2, 3], q = .5 -> position 2 -> τ_h = 2 exactly; H < τ_h is strict,
        # so the 2s stay and only the 1 is silenced
        ([1.0, 2.0, 2.0, 2.0, 3.0], 0.5, 2.0, [True, False, False, False, False]),
        # all equal: τ_h equals every entropy -> nothing silenced
        ([2.0, 2.0, 2.0], 0.75, 2.0, [False, False, False]),
        # a single candidate: τ_h is its own entropy -> not silenced, at any q
        ([0.3], 0.75, 0.3, [False]),
        ([0.3], 0.0, 0.3, [False]),
        # q = 1: τ_h = max -> everything below the max goes
        ([0.5, 0.1, 0.9], 1.0, 0.9, [True, True, False]),
    ],
)
def test_s2t_ties_and_single_candidate(entropies, q, tau, silenced):
    n = len(entropies)
    lp, ent = t([[LOW] * n]), t([entropies])
    adv, mask = t([1.0]), torch.ones(1, n, dtype=torch.bool)
    assert s2t_threshold([(lp, ent, adv, mask)], entropy_quantile=q) == tau
    assert s2t_mask(lp, ent, adv, mask, entropy_quantile=q)[0].tolist() == silenced


def test_s2t_no_candidates_and_explicit_threshold():
    lp, ent = t([[HIGH, HIGH, LOW]]), t([[0.1, 0.2, 0.3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # no candidates (high p, or A < 0): nothing is silenced, the mini-batch τ_h is −inf (silences nothing)
    assert not s2t_mask(lp, ent, t([-1.0]), mask).any()
    assert s2t_threshold([(lp, ent, t([-1.0]), mask)]) == -math.inf
    assert not s2t_mask(lp, ent, t([-1.0]), mask, entropy_threshold=-math.inf).any()
    # prob_threshold = 0: no probability is below 0 -> no candidates even at p = e^-7
    assert not s2t_mask(lp, ent, t([1.0]), mask, prob_threshold=0.0).any()
    # an explicit τ_h replaces the quantile: only the one candidate (H = 0.3) is compared to it
    assert s2t_mask(lp, ent, t([1.0]), mask, entropy_threshold=0.31).tolist() == [[False, False, True]]
    assert not s2t_mask(lp, ent, t([1.0]), mask, entropy_threshold=0.3).any()
    # a larger τ_p turns the high-p tokens into candidates: [.1, .2, .3], q = .75 -> τ_h = .25
    assert s2t_mask(lp, ent, t([1.0]), mask, prob_threshold=0.5).tolist() == [[True, True, False]]


def test_s2t_is_detached_and_keeps_shape():
    lp = t([[LOW, LOW, HIGH]]).requires_grad_(True)
    ent = t([[0.1, 0.9, 0.5]]).requires_grad_(True)
    out = s2t_mask(lp, ent, t([1.0]), torch.ones(1, 3))  # a float 0/1 mask is accepted too
    assert out.dtype == torch.bool and out.shape == (1, 3) and not out.requires_grad
    assert out.tolist() == [[True, False, False]]  # τ_h = .1 + .75·.8 = .7


# --- 20-Entropy, worked by hand -----------------------------------------------------------------------

def test_high_entropy_hand_worked():
    # ten valid tokens with entropies .1 … 1.0 and a padded one with entropy 9 (never kept, never counted)
    # top 20% -> the 0.8 quantile: position .8·9 = 7.2 -> .8 + .2·(.9 − .8) = .82 -> keep .9 and 1.0
    ent = t([[0.1 * (i + 1) for i in range(10)] + [9.0]])
    mask = torch.tensor([[True] * 10 + [False]])
    kept = high_entropy_mask(ent, mask)
    assert kept[0].tolist() == [False] * 8 + [True, True, False]
    assert high_entropy_threshold([(ent, mask)]) == pytest.approx(0.82, abs=1e-12)


@pytest.mark.parametrize(
    "entropies,top_ratio,kept",
    [
        # [1, 1, 1, 1, 5], q = .8 -> position 3.2 -> 1 + .2·4 = 1.8 -> only the 5
        ([1.0, 1.0, 1.0, 1.0, 5.0], 0.2, [False, False, False, False, True]),
        # ties at the cut: [1, 2, 3, 3, 3] -> position 3.2 -> 3 + .2·0 = 3; H ≥ 3 keeps all three 3s
        ([1.0, 2.0, 3.0, 3.0, 3.0], 0.2, [False, False, True, True, True]),
        # top_ratio = 1: the 0 quantile is the minimum -> every valid token is kept
        ([0.4, 0.1, 0.7], 1.0, [True, True, True]),
        # a single valid token is its own cut -> kept
        ([0.4], 0.2, [True]),
    ],
)
def test_high_entropy_ties(entropies, top_ratio, kept):
    ent = t([entropies])
    assert high_entropy_mask(ent, torch.ones_like(ent, dtype=torch.bool), top_ratio)[0].tolist() == kept


def test_high_entropy_no_valid_tokens_and_explicit_threshold():
    ent = t([[0.1, 0.5]])
    none = torch.zeros(1, 2, dtype=torch.bool)
    assert not high_entropy_mask(ent, none).any()
    assert high_entropy_threshold([(ent, none)]) == math.inf
    assert high_entropy_mask(ent, ~none, entropy_threshold=0.5).tolist() == [[False, True]]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_bad_levels_are_clear_errors(bad):
    ent, mask = t([[0.1]]), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="top_ratio"):
        high_entropy_mask(ent, mask, top_ratio=bad)
    with pytest.raises(ValueError, match="top_ratio"):
        high_entropy_threshold([(ent, mask)], top_ratio=bad)
    if bad != 0.0:  # q = 0 is a valid quantile
        with pytest.raises(ValueError, match="entropy_quantile"):
            s2t_mask(t([[HIGH]]), ent, t([1.0]), mask, entropy_quantile=bad)  # even with no candidates
        with pytest.raises(ValueError, match="entropy_quantile"):
            s2t_threshold([(t([[LOW]]), ent, t([1.0]), mask)], entropy_quantile=bad)


# --- random inputs vs the float64 reference -----------------------------------------------------------

specs = st.builds(
    dict,
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 8),
    T=st.integers(1, 12),
    token_adv=st.booleans(),
    layout=st.sampled_from(["right", "left", "holes"]),
    entropy_grid=st.sampled_from([None, 0.5, 1.0]),  # coarse grids force ties at the cut
)


@settings(max_examples=60, deadline=None)
@given(spec=specs, prob=st.sampled_from([0.0, 1e-3, 2e-3, 0.1]), q=st.sampled_from([0.0, 0.3, 0.75, 1.0]),
       top_ratio=st.sampled_from([0.05, 0.2, 0.5, 1.0]))
def test_masks_match_reference(spec, prob, q, top_ratio):
    b = ref.random_batch(**spec)
    lp, ent, adv = (ref.as_lists(b[k]) for k in ("logprobs", "entropy", "advantages"))
    mask = b["response_mask"].tolist()
    silenced, cand, _ = ref.s2t(lp, ent, adv, mask, prob, q)
    got = s2t_mask(b["logprobs"], b["entropy"], b["advantages"], b["response_mask"], prob, q)
    assert got.tolist() == silenced
    assert s2t_candidates(b["logprobs"], b["advantages"], b["response_mask"], prob).tolist() == cand
    kept, _ = ref.high_entropy(ent, mask, top_ratio)
    assert high_entropy_mask(b["entropy"], b["response_mask"], top_ratio).tolist() == kept


# --- micro-batch invariance ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(spec=specs, k=st.integers(1, 8), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_masks_are_micro_batch_invariant(spec, k, dtype):
    b = {key: v.to(dtype) if v.is_floating_point() else v for key, v in ref.random_batch(**spec).items()}
    B = b["response_mask"].shape[0]
    cuts = sorted({i * B // k for i in range(k + 1)})
    micro = [{key: v[a:c] for key, v in b.items()} for a, c in itertools.pairwise(cuts)]
    quads = [(m["logprobs"], m["entropy"], m["advantages"], m["response_mask"]) for m in micro]
    tau_s2t = s2t_threshold(quads)
    tau_h = high_entropy_threshold([(m["entropy"], m["response_mask"]) for m in micro])
    whole_s2t = s2t_mask(b["logprobs"], b["entropy"], b["advantages"], b["response_mask"])
    whole_h = high_entropy_mask(b["entropy"], b["response_mask"])
    split_s2t = torch.cat([s2t_mask(*q, entropy_threshold=tau_s2t) for q in quads])
    split_h = torch.cat([high_entropy_mask(m["entropy"], m["response_mask"], entropy_threshold=tau_h)
                         for m in micro])
    assert torch.equal(split_s2t, whole_s2t)
    assert torch.equal(split_h, whole_h)


def test_gather_sees_every_rank():
    # two "ranks" whose candidate entropies are [1, 2] and [3, 4]: the pooled q = .75 cut is
    # position 2.25 of [1, 2, 3, 4] -> 3.25, whatever rank computes it
    def quad(e):
        return (t([[LOW, LOW]]), t([e]), t([1.0]), torch.ones(1, 2, dtype=torch.bool))

    other = torch.tensor([3.0, 4.0], dtype=torch.float64)
    tau = s2t_threshold([quad([1.0, 2.0])], gather=lambda v: torch.cat([v, other]))
    assert tau == 3.25


# --- quantile ------------------------------------------------------------------------------------------

def test_quantile_above_torch_limit(monkeypatch):
    # torch.quantile refuses more than 2**24 values; the sort-based path must give the same numbers
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        values = torch.randn(n, generator=g, dtype=torch.float64)
        if n > 2:
            values[1:3] = values[0]  # ties
        for q in (0.0, 0.2, 0.75, 0.8, 1.0, 1 / 3):
            expected = float(torch.quantile(values, q))
            monkeypatch.setattr(masks, "TORCH_QUANTILE_MAX", 0)
            assert quantile(values, q) == expected
            monkeypatch.undo()
            assert quantile(values, q) == pytest.approx(ref.quantile_linear(values.tolist(), q), abs=1e-15)
    with pytest.raises(ValueError, match="empty"):
        quantile(torch.zeros(0), 0.5)
