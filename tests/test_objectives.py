"""Objectives (``stapo.policy_loss``) against the float64 reference in ``float64_reference.py``.

Layers: a hand-worked example; each objective vs the reference on random inputs (loss, gradient,
metrics); exact equalities between objectives; gradient accumulation over micro-batches; edge cases
(all masked, empty rows, padding garbage, fp32/bf16, silenced tokens get no gradient); registry.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import float64_reference as ref
import stapo
from stapo.objectives import (
    OBJECTIVES,
    TokenStats,
    count_units,
    get_objective,
    loss_token_mask,
    minibatch_overrides,
    policy_loss,
    register_objective,
)
from stapo.objectives import registry as registry_module

NAMES = ("grpo", "dapo", "dr_grpo", "justrl", "entropy20", "stapo")
# every objective, plus the non-default branches that change the maths
CASES = [(n, {}) for n in NAMES] + [
    ("grpo", {"kl_coef": 0.1}),
    ("entropy20", {"normalize_by": "all"}),
    ("stapo", {"loss_agg_mode": "seq-mean-token-mean"}),
]
CASE_IDS = [n + "".join(f"-{k}={v}" for k, v in o.items()) for n, o in CASES]
SETTINGS = settings(max_examples=25, deadline=None)


def run(name, batch, *, dtype=None, **kw):
    """policy_loss on ``batch`` with a leaf ``logprobs``; returns (loss, grad, metrics)."""
    lp = batch["logprobs"].detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(
        name, lp, batch["old_logprobs"], batch["advantages"], batch["response_mask"],
        entropy=batch.get("entropy"), ref_logprobs=batch.get("ref_logprobs"), **kw,
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics


def check_metrics(metrics, expected, rtol=1e-5, atol=1e-6):
    assert set(metrics) == set(expected), (sorted(metrics), sorted(expected))
    for k, v in expected.items():
        m = metrics[k]
        assert m.dim() == 0 and not m.requires_grad, k
        if math.isnan(v):
            assert math.isnan(float(m)), k
        else:
            assert float(m) == pytest.approx(v, rel=rtol, abs=atol), k


# --- a hand-worked example -------------------------------------------------------------------------

def test_justrl_hand_worked():
    # One sequence, three tokens, one per clip branch (ε_low 0.2, ε_high 0.28, c = 10):
    #   A=+1, ρ=1.5: −min(1.5, 1.28)            = −1.28   clip-high binds, gradient 0
    #   A=−1, ρ=0.5: −min(−0.5, −0.8) = 0.8                clip-low binds, gradient 0
    #   A=−1, ρ=20:  −min(−20, −1.28) = 20 -> min(20, 10) = 10   dual clip binds, gradient 0
    # token-mean: (−1.28 + 0.8 + 10) / 3 = 9.52 / 3
    lp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    old = -torch.log(torch.tensor([[1.5, 0.5, 20.0]], dtype=torch.float64))
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, metrics = policy_loss("justrl", lp, old, adv, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(9.52 / 3, abs=1e-12)
    assert torch.equal(lp.grad, torch.zeros(1, 3, dtype=torch.float64))  # every token is clipped
    for k in ("high", "low", "dual"):
        assert float(metrics[f"actor/clip_frac_{k}"]) == pytest.approx(1 / 3)
    # grpo has no dual clip: the third token keeps 20 and its −Aρ gradient (ρ = 20, /3 tokens)
    lp.grad = None
    loss, _ = policy_loss("grpo", lp, old, adv, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 20) / 3, abs=1e-12)
    assert lp.grad[0].tolist() == pytest.approx([0.0, 0.0, 20 / 3], abs=1e-12)


# --- every objective vs the float64 reference ---------------------------------------------------

batches = st.builds(
    dict,
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 6),
    T=st.integers(1, 10),
    ratio_scale=st.sampled_from([0.05, 0.5, 2.0]),
    token_adv=st.booleans(),
    layout=st.sampled_from(["right", "left", "holes"]),
    entropy_grid=st.sampled_from([None, 0.5]),
)


@pytest.mark.parametrize("name,overrides", CASES, ids=CASE_IDS)
@SETTINGS
@given(spec=batches)
def test_matches_reference(name, overrides, spec):
    batch = ref.random_batch(**spec, with_ref=True)
    loss, grad, metrics = run(name, batch, **overrides)
    want_loss, want_grad, want_metrics = ref.objective(name, **batch, **overrides)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    check_metrics(metrics, want_metrics)


@SETTINGS
@given(spec=batches, top_ratio=st.sampled_from([0.05, 0.2, 0.5]), prob=st.sampled_from([1e-3, 2e-3, 0.05]),
       q=st.sampled_from([0.0, 0.5, 0.75, 1.0]), mode=st.sampled_from(["token-mean", "seq-mean-token-sum"]))
def test_options_match_reference(spec, top_ratio, prob, q, mode):
    """Overridden options reach the maths (top_ratio, τ_p, q, ε, c, aggregation)."""
    batch = ref.random_batch(**spec)
    for name, over in (
        ("entropy20", {"top_ratio": top_ratio, "loss_agg_mode": mode}),
        ("stapo", {"prob_threshold": prob, "entropy_quantile": q, "clip_high": 0.4, "clip_ratio_c": 3.0}),
        ("dr_grpo", {"norm_length": 16, "clip_low": 0.1}),
    ):
        loss, grad, metrics = run(name, batch, **over)
        want_loss, want_grad, want_metrics = ref.objective(name, **batch, **over)
        assert float(loss) == pytest.approx(want_loss, rel=1e-12, abs=1e-12)
        torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        check_metrics(metrics, want_metrics)


def test_random_inputs_exercise_every_branch():
    """Guard against a reference test that passes vacuously: the strategy reaches each branch."""
    seen = dict.fromkeys(["high", "low", "dual", "silenced", "unkept"], 0.0)
    for seed in range(20):
        batch = ref.random_batch(seed, 6, 10, ratio_scale=2.0)
        *_, m = ref.objective("stapo", **batch)
        *_, m20 = ref.objective("entropy20", **batch)
        for k in ("high", "low", "dual"):
            seen[k] += m[f"actor/clip_frac_{k}"]
        seen["silenced"] += m["s2t/silenced"]
        seen["unkept"] += 1 - m20["entropy20/kept_fraction"]
    assert all(v > 0 for v in seen.values()), seen


# --- exact equalities between objectives --------------------------------------------------------

@SETTINGS
@given(spec=batches)
def test_stapo_without_candidates_is_justrl(spec):
    batch = ref.random_batch(**spec)
    loss_a, grad_a, _ = run("stapo", batch, prob_threshold=0.0)
    loss_b, grad_b, _ = run("justrl", batch)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


@SETTINGS
@given(spec=batches)
def test_entropy20_keeping_everything_is_justrl(spec):
    batch = ref.random_batch(**spec)
    for normalize_by in ("selected", "all"):
        loss_a, grad_a, metrics = run("entropy20", batch, top_ratio=1.0, normalize_by=normalize_by)
        loss_b, grad_b, _ = run("justrl", batch)
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
        if batch["response_mask"].any():
            assert float(metrics["entropy20/kept_fraction"]) == 1.0


# --- gradient accumulation: k micro-batches == the whole mini-batch -----------------------------

def accumulate(name, batch, k, overrides):
    """What a trainer does: mini-batch statistics first, then k forward/backward passes."""
    B = batch["response_mask"].shape[0]
    bounds = [(i * B // k, (i + 1) * B // k) for i in range(k)]
    micro = [{key: v[a:b] for key, v in batch.items()} for a, b in bounds]
    stats = [TokenStats(m["logprobs"], m["entropy"], m["advantages"], m["response_mask"]) for m in micro]
    mb = {**overrides, **minibatch_overrides(name, stats, **overrides)}
    mode = get_objective(name).config(**mb).loss_agg_mode
    denominator = sum(
        count_units(loss_token_mask(name, m["logprobs"], m["entropy"], m["advantages"], m["response_mask"],
                                    **mb), mode)
        for m in micro
    )
    lp = batch["logprobs"].detach().clone().requires_grad_(True)
    total = 0.0
    for (a, b), m in zip(bounds, micro):
        loss, _ = policy_loss(name, lp[a:b], m["old_logprobs"], m["advantages"], m["response_mask"],
                              entropy=m["entropy"], ref_logprobs=m.get("ref_logprobs"),
                              denominator=denominator, **mb)
        loss.backward()
        total = total + loss.detach()
    return total, lp.grad


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-12, 1e-15), (torch.float32, 1e-6, 1e-9)])
@pytest.mark.parametrize("name,overrides", CASES, ids=CASE_IDS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(["right", "left", "holes"]))
def test_micro_batch_gradient_accumulation(name, overrides, seed, layout, dtype, rtol, atol):
    batch = ref.random_batch(seed, 8, 12, dtype=dtype, ratio_scale=0.5, layout=layout, with_ref=True)
    whole_loss, whole_grad, _ = run(name, batch, **overrides)
    assume(whole_grad.abs().sum() > 0)  # rare: every kept token has A = 0 or is clipped
    for k in (2, 3, 8):
        loss, grad = accumulate(name, batch, k, overrides)
        # the loss is a signed sum (cancellation), so its tolerance is absolute, on the O(1) scale of the terms
        torch.testing.assert_close(loss, whole_loss, rtol=rtol, atol=rtol)
        torch.testing.assert_close(grad, whole_grad, rtol=rtol, atol=atol * float(whole_grad.abs().max()))


def test_accumulation_needs_the_minibatch_threshold():
    """Without the mini-batch τ_h each micro-batch silences different tokens (why the helpers exist)."""
    batch = ref.random_batch(3, 8, 12, ratio_scale=0.5)
    whole = ref.s2t(*(ref.as_lists(batch[k]) for k in ("logprobs", "entropy", "advantages")),
                    batch["response_mask"].tolist())[0]
    per_micro = []
    for a in range(0, 8, 2):
        rows = {k: ref.as_lists(batch[k][a:a + 2]) for k in ("logprobs", "entropy", "advantages")}
        per_micro += ref.s2t(rows["logprobs"], rows["entropy"], rows["advantages"],
                             batch["response_mask"][a:a + 2].tolist())[0]
    assert per_micro != whole


# --- edge cases -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("denominator", [None, 0, 7])
def test_all_masked_gives_zero_loss_and_zero_grad(name, overrides, denominator):
    batch = ref.random_batch(0, 3, 5, with_ref=True)
    batch["response_mask"] = torch.zeros(3, 5, dtype=torch.bool)
    loss, grad, metrics = run(name, batch, denominator=denominator, **overrides)
    assert float(loss) == 0.0 and torch.isfinite(loss)
    assert torch.equal(grad, torch.zeros_like(grad))
    for k, v in metrics.items():
        assert torch.isfinite(v) or k == "s2t/entropy_threshold", k  # no candidates: τ_h is undefined


@pytest.mark.parametrize("name", NAMES)
def test_empty_rows_do_not_count(name):
    # Row 1 has no valid token. For seq-mean modes it must not dilute the mean (2 sequences, not 3);
    # for token-mean it contributes nothing. Equal to the loss on the two non-empty rows alone.
    batch = ref.random_batch(5, 3, 6, layout="holes")
    batch["response_mask"][1] = False
    batch["response_mask"][[0, 2], :2] = True
    loss, grad, _ = run(name, batch)
    rows = {k: v[[0, 2]] for k, v in batch.items()}
    loss2, grad2, _ = run(name, rows)
    torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[[0, 2]], grad2, rtol=1e-12, atol=1e-15)
    assert torch.equal(grad[1], torch.zeros(6, dtype=torch.float64))


FLOAT_INPUTS = ("logprobs", "old_logprobs", "advantages", "entropy", "ref_logprobs")


def _with_garbage(batch, value, fields):
    """The same batch with ``value`` written into every padded position of ``fields``."""
    pad = ~batch["response_mask"]
    return {k: v.masked_fill(pad, value) if k in fields else v for k, v in batch.items()}


@pytest.mark.parametrize("name,overrides", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["left", "right"])
@pytest.mark.parametrize("garbage", [-math.inf, math.inf, math.nan, -1e30])
def test_padding_garbage_does_not_leak(name, overrides, layout, garbage):
    batch = ref.random_batch(11, 4, 7, token_adv=True, layout=layout, ratio_scale=0.5, with_ref=True)
    batch["response_mask"][0] = False  # and one empty row
    clean_loss, clean_grad, clean_metrics = run(name, batch, **overrides)
    assert torch.equal(clean_grad[~batch["response_mask"]], torch.zeros_like(clean_grad[~batch["response_mask"]]))
    # each input alone (finite logprobs elsewhere must not open a path for a NaN advantage), then all
    for fields in [(f,) for f in FLOAT_INPUTS] + [FLOAT_INPUTS]:
        loss, grad, metrics = run(name, _with_garbage(batch, garbage, fields), **overrides)
        assert torch.equal(loss, clean_loss), fields
        assert torch.equal(grad, clean_grad), fields  # finite, and exactly 0 at every padded position
        for k in clean_metrics:
            torch.testing.assert_close(metrics[k], clean_metrics[k], equal_nan=True, msg=f"{k} {fields}")


@pytest.mark.parametrize("name", NAMES)
def test_float32_matches_float64_reference(name):
    batch = ref.random_batch(21, 6, 10, dtype=torch.float32, ratio_scale=0.5, with_ref=True)
    loss, grad, metrics = run(name, batch)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    want_loss, want_grad, want_metrics = ref.objective(name, **batch)  # on the same (rounded) inputs
    assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    check_metrics(metrics, want_metrics, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs(name):
    # |log ρ| ≤ 0.05 keeps every ρ well inside the clip range, so bf16 rounding cannot flip a clip
    # decision; masks are decided on the bf16 values themselves (the reference gets the same ones).
    batch = ref.random_batch(4, 6, 10, ratio_scale=0.02, token_adv=True)
    batch["old_logprobs"] = batch["logprobs"] - (batch["old_logprobs"] - batch["logprobs"]).clamp(-0.05, 0.05)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    loss, grad, metrics = run(name, batch)
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want_loss, want_grad, want_metrics = ref.objective(name, **batch)
    assert float(loss) == pytest.approx(want_loss, rel=3e-2, abs=3e-3)
    want_grad = torch.tensor(want_grad, dtype=torch.float64)
    torch.testing.assert_close(grad.double(), want_grad, rtol=3e-2, atol=3e-2 * float(want_grad.abs().max()))
    # the same tokens get a gradient (masks decided identically)
    assert torch.equal(grad != 0, want_grad != 0)
    for k in ("s2t/candidates", "s2t/silenced", "entropy20/kept_fraction"):
        if k in metrics:
            assert float(metrics[k]) == pytest.approx(want_metrics[k], abs=1e-6)


def _ratio_one_batch(seed=8, B=6, T=10):
    """ρ = 1 everywhere, so the gradient of every kept token with A ≠ 0 is −A·w ≠ 0."""
    batch = ref.random_batch(seed, B, T, layout="holes")
    batch["old_logprobs"] = batch["logprobs"].clone()
    batch["advantages"] = batch["advantages"].abs() + 0.5  # A > 0 everywhere: all low-p tokens are candidates
    return batch


def test_silenced_tokens_get_exactly_zero_gradient():
    batch = _ratio_one_batch()
    silenced, *_ = ref.s2t(ref.as_lists(batch["logprobs"]), ref.as_lists(batch["entropy"]),
                           ref.as_lists(batch["advantages"]), batch["response_mask"].tolist())
    silenced = torch.tensor(silenced)
    assert silenced.sum() >= 3
    _, grad, metrics = run("stapo", batch)
    assert float(metrics["s2t/silenced"]) == silenced.sum()
    assert (grad[silenced] == 0.0).all()
    kept = batch["response_mask"] & ~silenced
    assert (grad[kept] != 0.0).all()
    assert (grad[~batch["response_mask"]] == 0.0).all()
    # and through the trainer's path (mini-batch τ_h passed in), too
    stats = [TokenStats(batch["logprobs"], batch["entropy"], batch["advantages"], batch["response_mask"])]
    _, grad_mb, _ = run("stapo", batch, **minibatch_overrides("stapo", stats))
    assert torch.equal(grad_mb, grad)


@pytest.mark.parametrize("normalize_by", ["selected", "all"])
def test_unkept_tokens_get_exactly_zero_gradient(normalize_by):
    batch = _ratio_one_batch(seed=9)
    kept, _ = ref.high_entropy(ref.as_lists(batch["entropy"]), batch["response_mask"].tolist())
    kept = torch.tensor(kept)
    _, grad, _ = run("entropy20", batch, normalize_by=normalize_by)
    assert (grad[kept] != 0.0).all()
    assert (grad[~kept] == 0.0).all()


@pytest.mark.parametrize("name", NAMES)
def test_stale_tokens_stay_finite(name):
    # log ρ = ±50 would overflow exp in fp32 without the ±20 clamp; loss and grads must stay finite
    batch = ref.random_batch(2, 2, 4, dtype=torch.float32)
    batch["old_logprobs"] = batch["logprobs"] + torch.tensor([[50.0, -50.0, 0, 0], [-50.0, 50.0, 0, 0]])
    batch["advantages"] = torch.tensor([1.0, -1.0])
    batch["response_mask"] = torch.ones(2, 4, dtype=torch.bool)
    loss, grad, metrics = run(name, batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) or k == "s2t/entropy_threshold" for k, v in metrics.items())


# --- errors and the registry ------------------------------------------------------------------------

def test_objective_names_and_defaults():
    assert set(NAMES) <= set(OBJECTIVES) and stapo.OBJECTIVES is OBJECTIVES
    for name in NAMES:
        cfg = dataclasses.asdict(get_objective(name).config())
        for key, value in {**ref.BASE, **ref.DEFAULTS[name]}.items():
            assert cfg[key] == value, (name, key)


def test_override_changes_config_and_unknown_override_is_an_error():
    # one token, A = +1, ρ = 1.2: inside DAPO's 1.28 (loss −1.2), clipped at 1.01 by the override
    one = {
        "logprobs": torch.zeros(1, 1, dtype=torch.float64),
        "old_logprobs": -torch.tensor([[1.2]], dtype=torch.float64).log(),
        "advantages": torch.ones(1, dtype=torch.float64),
        "response_mask": torch.ones(1, 1, dtype=torch.bool),
    }
    assert run("dapo", one)[0].item() == pytest.approx(-1.2)
    assert run("dapo", one, clip_high=0.01)[0].item() == pytest.approx(-1.01)
    batch = ref.random_batch(1, 2, 3)
    with pytest.raises(TypeError, match=r"no option.*clip_hgih.*valid options.*clip_high"):
        run("dapo", batch, clip_hgih=0.3)
    with pytest.raises(ValueError, match="normalize_by"):
        run("entropy20", batch, normalize_by="everything")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        run("justrl", batch, loss_agg_mode="token-sum")


def test_unknown_objective_lists_names():
    with pytest.raises(KeyError) as err:
        policy_loss("ppo2", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))
    for name in NAMES:
        assert name in str(err.value)


def test_duplicate_registration_raises_and_new_names_register():
    with pytest.raises(ValueError, match="already registered"):
        register_objective("justrl", type(get_objective("justrl").config()))(lambda *a, **k: None)
    assert get_objective("justrl").fn.__name__ == "justrl"  # the original is untouched

    @dataclasses.dataclass(frozen=True)
    class HalfConfig:
        scale: float = 0.5

    def half(cfg, logprobs, old_logprobs, advantages, response_mask, **kw):
        return cfg.scale * logprobs[response_mask].sum(), {}

    try:
        register_objective("_test_half", HalfConfig)(half)
        loss, _ = policy_loss("_test_half", torch.ones(1, 2), torch.ones(1, 2), torch.ones(1),
                              torch.tensor([[True, False]]), scale=3.0)
        assert float(loss) == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_objective("_test_half", HalfConfig)(half)
    finally:
        registry_module._REGISTRY.pop("_test_half", None)


def test_clear_errors_for_bad_inputs():
    b = ref.random_batch(0, 2, 3, with_ref=True)
    with pytest.raises(ValueError, match="ref_logprobs"):  # β > 0 needs a reference
        policy_loss("grpo", b["logprobs"], b["old_logprobs"], b["advantages"], b["response_mask"], kl_coef=0.1)
    for name in ("stapo", "entropy20"):
        with pytest.raises(ValueError, match="entropy"):
            policy_loss(name, b["logprobs"], b["old_logprobs"], b["advantages"], b["response_mask"])
        with pytest.raises(ValueError, match="entropy"):
            loss_token_mask(name, b["logprobs"], None, b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="entropy"):
        policy_loss("stapo", b["logprobs"], b["old_logprobs"], b["advantages"], b["response_mask"],
                    entropy=b["entropy"].T)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss("grpo", b["logprobs"], b["old_logprobs"], b["advantages"], b["response_mask"],
                    ref_logprobs=b["ref_logprobs"][:, :2], kl_coef=0.1)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss("dapo", b["logprobs"], b["old_logprobs"][:, :2], b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss("dapo", b["logprobs"], b["old_logprobs"], b["advantages"][:1], b["response_mask"])
    with pytest.raises(ValueError, match="top_ratio"):
        policy_loss("entropy20", b["logprobs"], b["old_logprobs"], b["advantages"], b["response_mask"],
                    entropy=b["entropy"], top_ratio=0.0)
