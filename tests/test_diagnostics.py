"""Token diagnostics, unit level: closed forms against autograd and finite differences (float64),
hand-worked numbers, the taxonomy and its reduction across micro-batches and ranks."""

import json
import math

import pytest
import torch

from stapo.diagnostics import metrics as M
from stapo.diagnostics import theory as T
from stapo.diagnostics.report import load_metrics
from stapo.objectives import clipped_surrogate, s2t_mask
from stapo.objectives.losses import JustRLConfig


def _random_logits(n, vocab, seed=0):
    """Rows from near-uniform to near-one-hot (temperatures 0.1 .. 30)."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) * 2.5 - 1)
    return torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale


# --- theory: gradient norm ---------------------------------------------------------------------

def test_grad_norm_matches_autograd_float64():
    z = _random_logits(300, 37)
    k = torch.randint(37, (300,), generator=torch.Generator().manual_seed(1))
    w = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((w * torch.log_softmax(zg, -1).gather(-1, k[:, None])[:, 0]).sum(), zg)
    st = T.logit_stats(z, k, dtype=torch.float64)
    closed = T.logit_grad_norm_sq(w, st.logprobs.exp(), st.collision)
    torch.testing.assert_close(closed, (grad**2).sum(-1), rtol=1e-10, atol=1e-300)


def test_grad_norm_hand_worked_binary():
    # V = 2, π = (0.25, 0.75), k = 0, w = 2: ‖w(e_0 − π)‖² = 4 (0.75² + 0.75²) = 4.5
    # and the formula: 4 (1 − 0.5 + 0.0625 + 0.5625) = 4.5
    p, coll = torch.tensor(0.25), torch.tensor(0.25**2 + 0.75**2)
    assert float(T.logit_grad_norm_sq(torch.tensor(2.0), p, coll)) == pytest.approx(4.5, rel=1e-12)


def test_bounds_hold_and_are_tight():
    for vocab in (2, 3, 17, 500):
        z = _random_logits(400, vocab, seed=vocab)
        z[:100, : vocab // 2] = -float("inf")  # sparse supports
        noise = torch.rand(z.shape, generator=torch.Generator().manual_seed(vocab), dtype=z.dtype)
        k = torch.argmax(z + noise, -1)  # a token in the support
        st = T.logit_stats(z, k, dtype=torch.float64)
        w = torch.full((400,), 1.7, dtype=torch.float64)
        exact = T.logit_grad_norm_sq(w, st.logprobs.exp(), st.collision)
        lo, hi = T.grad_norm_sq_bounds(w, st.logprobs.exp(), st.entropy, vocab)
        assert bool((lo <= exact * (1 + 1e-12) + 1e-15).all()) and bool((exact <= hi * (1 + 1e-12) + 1e-15).all())
    # uniform: Σπ² = 1/V and C_V (ln V)² = (V−1)/V, so the upper bound is attained
    vocab = 50
    u = torch.zeros(1, vocab, dtype=torch.float64)
    st = T.logit_stats(u, torch.tensor([3]), dtype=torch.float64)
    exact = T.logit_grad_norm_sq(torch.ones(1), st.logprobs.exp(), st.collision)
    _, hi = T.grad_norm_sq_bounds(torch.ones(1), st.logprobs.exp(), st.entropy, vocab)
    torch.testing.assert_close(exact, hi.to(exact.dtype), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="vocab_size"):
        T.collision_bound_constant(1)


def test_logit_stats_chunked_and_masked_vocab():
    z = _random_logits(53, 29, seed=3).reshape(53, 1, 29).float()
    z[::4, :, 5:] = -float("inf")  # a masked vocabulary must give 0, not NaN
    ids = torch.zeros(53, 1, dtype=torch.long)
    ref = T.logit_stats(z.double(), ids, chunk_size=10**6, dtype=torch.float64)
    got = T.logit_stats(z, ids, chunk_size=7)
    for a, b in zip(got, ref):
        assert a.shape == (53, 1) and not a.isnan().any()
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6)
    # reference sums by definition
    p = torch.softmax(z.double(), -1)
    torch.testing.assert_close(ref.collision, (p * p).sum(-1))
    with pytest.raises(ValueError, match="token_ids shape"):
        T.logit_stats(z, torch.zeros(3, dtype=torch.long))


# --- theory: surrogate weight ------------------------------------------------------------------

@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_surrogate_weight_is_the_loss_gradient(clip_ratio_c):
    # d(−loss)/d logπ for the clipped surrogate of stapo.objectives must be w = ρA or 0
    g = torch.Generator().manual_seed(0)
    old = torch.randn(8, 50, generator=g, dtype=torch.float64) - 2
    lp = (old + torch.randn(8, 50, generator=g, dtype=torch.float64) * 0.8).requires_grad_(True)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    cfg = JustRLConfig(clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c)
    loss, clips, _ = clipped_surrogate(lp, old, adv, cfg)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    w = T.surrogate_weight(lp, old, adv, clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c)
    torch.testing.assert_close(w, -grad, rtol=1e-12, atol=1e-12)
    # every regime was exercised
    assert bool(clips["high"].any()) and bool(clips["low"].any()) and bool((w != 0).any())
    if clip_ratio_c is not None:
        assert bool(clips["dual"].any())


# --- theory: entropy change --------------------------------------------------------------------

def test_entropy_change_exact_matches_finite_differences():
    z = _random_logits(200, 23, seed=5)
    k = torch.randint(23, (200,), generator=torch.Generator().manual_seed(6))
    adv = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    st = T.logit_stats(z, k, dtype=torch.float64)
    pi = torch.softmax(z, -1)
    step = adv[:, None] * (torch.nn.functional.one_hot(k, 23) - pi)  # ∇_z (A log π_k)

    def ent(x):
        lp = torch.log_softmax(x, -1)
        return -(lp.exp() * lp).sum(-1)

    h = 1e-5  # central difference: O(h²) error
    fd = (ent(z + h * step) - ent(z - h * step)) / (2 * h)
    pred = T.entropy_change_exact(st.logprobs, st.entropy, st.collision, st.p2logp, adv)
    torch.testing.assert_close(pred, fd, rtol=1e-6, atol=1e-9)
    # the paper's form is the directional derivative along the natural-gradient step A e_k / p
    nat = adv[:, None] * torch.nn.functional.one_hot(k, 23) / st.logprobs.exp()[:, None]
    # 1/p is huge for rare tokens: step z_k by 1e-4 (ΔH ≈ 1e-4·p·|log p + H|), and only where p ≥ 1e-4 so
    # that change stays far above float64's resolution of H
    hn = 1e-4 * st.logprobs.exp()[:, None]
    fd_nat = (ent(z + hn * nat) - ent(z - hn * nat)) / (2 * hn[:, 0])
    ok = st.logprobs.exp() > 1e-4
    assert int(ok.sum()) > 100
    # rounding of H (~1e-16) over the 2e-4·p step bounds the difference quotient's error by ~1e-8
    torch.testing.assert_close(T.entropy_change_natural(st.logprobs, st.entropy, adv)[ok], fd_nat[ok],
                               rtol=1e-6, atol=1e-7)


def test_entropy_change_hand_worked_binary():
    # V = 2, π = (p, q) = (0.2, 0.8), A = 1. log p + H = q (log p − log q), log q + H = p (log q − log p), so
    # ΔH = −A [p·q(log p + H) − q²(log q + H)] = −2 A p q² (log p − log q) = 2·0.2·0.64·ln 4 = 0.354891...
    p, q = 0.2, 0.8
    h = -(p * math.log(p) + q * math.log(q))
    def t(x):
        return torch.tensor([x], dtype=torch.float64)

    dh = T.entropy_change_exact(t(math.log(p)), t(h), t(p * p + q * q), t(p * p * math.log(p) + q * q * math.log(q)),
                                t(1.0))
    assert float(dh) == pytest.approx(0.256 * math.log(4), rel=1e-12)
    assert bool(T.raises_entropy_paper(t(math.log(p)), t(h)))  # 0.2 < e^{−0.500} = 0.606
    assert float(T.entropy_change_natural(t(math.log(p)), t(h), t(1.0))) == pytest.approx(-q * math.log(p / q))


# --- metrics -----------------------------------------------------------------------------------

def _batch(seed=0, b=6, t=40, vocab=64):
    """Statistics of random softmax rows, with a spread of p (some far below τ_p) and mixed A."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, vocab, generator=g) * (torch.rand(b, t, 1, generator=g) * 6)
    ids = torch.randint(vocab, (b, t), generator=g)
    st = T.logit_stats(z, ids)
    adv = torch.tensor([1.0, -0.5, 0.7, 0.0, 1.3, -1.0])[:b]
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, t - 5 :] = False
    old = st.logprobs + torch.randn(b, t, generator=g) * 0.3
    stats = {"logprobs": st.logprobs, "entropy": st.entropy, "collision": st.collision, "advantages": adv,
             "old_logprobs": old, "response_mask": mask}
    return stats, st.p2logp


def test_quadrants_and_silenced_match_s2t():
    kw, p2 = _batch()
    out = M.token_diagnostics(**kw, vocab_size=64, prob_threshold=0.01, p2logp=p2)
    valid, adv = kw["response_mask"], kw["advantages"][:, None].expand_as(kw["logprobs"])
    pos = valid & (adv > 0)
    assert out["diag/pos_tokens"] == float(pos.sum())
    assert sum(out[f"diag/quadrant/{q}/count"] for q in M.QUADRANTS) == float(pos.sum())
    silenced = s2t_mask(kw["logprobs"], kw["entropy"], kw["advantages"], valid, prob_threshold=0.01)
    assert silenced.sum() > 0
    # with the S2T thresholds the spurious quadrant *is* the silenced set
    assert out["diag/quadrant/low_p_low_h/count"] == out["diag/silenced/count"] == float(silenced.sum())
    # low-p = p < τ_p among positive tokens
    low_p = out["diag/quadrant/low_p_low_h/count"] + out["diag/quadrant/low_p_high_h/count"]
    assert low_p == float((pos & (kw["logprobs"].exp() < 0.01)).sum())
    # entropy-up fractions against their definitions
    paper = (pos & (kw["logprobs"].double() + kw["entropy"].double() < 0)).sum() / pos.sum()
    assert out["diag/entropy_up/paper_fraction"] == pytest.approx(float(paper))
    assert 0 <= out["diag/entropy_up/exact_fraction"] <= 1
    assert out["diag/bounds/violations"] == 0
    # the silenced share of Σ‖∇‖² recomputed directly
    w = T.surrogate_weight(kw["logprobs"], kw["old_logprobs"], kw["advantages"])
    gsq = T.logit_grad_norm_sq(w, kw["logprobs"].exp(), kw["collision"]) * valid
    assert out["diag/silenced/grad_sq_share"] == pytest.approx(float(gsq[silenced].sum() / gsq.sum()), rel=1e-9)
    # max ≥ mean within each populated quadrant
    for q in M.QUADRANTS:
        if out[f"diag/quadrant/{q}/count"]:
            assert out[f"diag/grad_norm/{q}/max"] >= out[f"diag/grad_norm/{q}/mean"] > 0


def test_given_silenced_mask_and_missing_p2logp():
    kw, _ = _batch()
    given = torch.zeros_like(kw["response_mask"])
    given[0, :3] = True
    given[0, -1] = True  # invalid position: must not count
    out = M.token_diagnostics(**kw, vocab_size=64, silenced=given)
    assert out["diag/silenced/count"] == 3.0
    assert "diag/entropy_up/exact_fraction" not in out  # needs Σπ² log π


def test_entropy_threshold_falls_back_to_positive_tokens():
    kw, _ = _batch()
    kw["logprobs"] = kw["logprobs"].clamp(min=math.log(0.5))  # no p < τ_p: no S2T candidate
    valid = kw["response_mask"]
    pos = valid & (kw["advantages"][:, None] > 0)
    tau = M.diagnostic_entropy_threshold([(kw["logprobs"], kw["entropy"], kw["advantages"], valid)])
    assert tau == pytest.approx(float(torch.quantile(kw["entropy"].double()[pos], 0.75)))
    out = M.token_diagnostics(**kw, vocab_size=64)
    assert out["diag/entropy_threshold"] == pytest.approx(tau)
    assert out["diag/silenced/count"] == 0.0  # S2T itself silences nothing without candidates
    # s2t_threshold's "no candidate" value (−inf) passed through by a trainer gives the same
    assert M.token_diagnostics(**kw, vocab_size=64, entropy_threshold=-math.inf) == out
    assert out["diag/quadrant/high_p_low_h/count"] == pytest.approx(round(0.75 * float(pos.sum())), abs=1)
    # no positive token at all: no threshold, no fractions, nothing NaN
    none = M.token_diagnostics(**{**kw, "advantages": -kw["advantages"].abs()}, vocab_size=64)
    assert none["diag/pos_tokens"] == 0 and "diag/quadrant/low_p_low_h/fraction" not in none
    assert all(math.isfinite(v) for v in none.values())


def test_accumulator_matches_one_call_and_reduces_across_ranks():
    kw, p2 = _batch(seed=4)
    whole = M.token_diagnostics(**kw, vocab_size=64, prob_threshold=0.01, p2logp=p2)
    tau = M.diagnostic_entropy_threshold([(kw["logprobs"], kw["entropy"], kw["advantages"],
                                           kw["response_mask"])], prob_threshold=0.01)
    accs = [M.DiagnosticsAccumulator() for _ in range(2)]  # rank 0: rows 0 and 1-3; rank 1: rows 4-5
    for rank, sl in [(0, slice(0, 1)), (0, slice(1, 4)), (1, slice(4, 6))]:
        part = {k: v[sl] for k, v in kw.items()}
        accs[rank].add(**part, vocab_size=64, prob_threshold=0.01, entropy_threshold=tau, p2logp=p2[sl])
    # what torch.distributed.all_reduce(SUM / MAX) returns on every rank, from each rank's own vector
    local = {(r, prefix): torch.tensor([a.sums[k] for k in sorted(a.sums) if k.startswith(prefix)],
                                       dtype=torch.float64)
             for r, a in enumerate(accs) for prefix in ("sum/", "max/")}
    for r, acc in enumerate(accs):
        def reduce(prefix, op, r=r):
            def fn(v):
                assert torch.equal(v, local[(r, prefix)])  # the accumulator sends its own statistics
                return op(local[(0, prefix)], local[(1, prefix)])
            return fn
        acc.all_reduce(reduce("sum/", torch.add), reduce("max/", torch.maximum))
        got = acc.finalize()
        assert got.keys() == whole.keys()
        for key in whole:
            assert got[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    with pytest.raises(KeyError, match="neither"):
        M.DiagnosticsAccumulator().add_sums({"diag/x": 1.0})


def test_bad_shapes_name_the_field():
    kw, _ = _batch()
    with pytest.raises(ValueError, match="collision shape"):
        M.token_diagnostics(**{**kw, "collision": kw["collision"][:, :3]}, vocab_size=64)
    with pytest.raises(ValueError, match="advantages"):
        M.token_diagnostics(**{**kw, "advantages": torch.ones(2)}, vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size"):
        M.token_diagnostics(**kw, vocab_size=1)


# --- metrics.jsonl reader ----------------------------------------------------------------------

def test_load_metrics_errors_and_partial_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "a": 1.0}) + "\n" + '{"step": 2, "a"')
    assert [r["step"] for r in load_metrics(tmp_path)] == [1]  # a run still writing its last line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="'step'"):
        load_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_metrics(tmp_path / "nope")


def test_public_names_resolve():
    import stapo.diagnostics as D

    assert set(D.__all__) == set(D._LAZY)
    for name in D.__all__:
        assert getattr(D, name) is not None
