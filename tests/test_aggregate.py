"""``agg_loss`` / ``count_units``: verl's four modes vs a loop reference, global denominators, edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import float64_reference as ref
from stapo.objectives import AGG_MODES, agg_loss, count_units


def test_modes_hand_worked():
    # Two sequences, T = 4:  row 0 losses [1, 2, 3, ·] (3 valid), row 1 [4, ·, ·, ·] (1 valid).
    loss = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    expected = {
        "token-mean": (1 + 2 + 3 + 4) / 4,  # 2.5
        "seq-mean-token-mean": (6 / 3 + 4 / 1) / 2,  # 3.0
        "seq-mean-token-sum": (6 + 4) / 2,  # 5.0
        "seq-mean-token-sum-norm": (6 / 4 + 4 / 4) / 2,  # 1.25 (L = T = 4)
    }
    for mode, value in expected.items():
        assert agg_loss(loss, mask, mode).item() == pytest.approx(value, abs=1e-15)
    # Dr. GRPO's constant: L = 10 instead of the padded length
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(0.5)
    assert count_units(mask, "token-mean") == 4
    assert all(count_units(mask, m) == 2 for m in AGG_MODES[1:])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), T=st.integers(1, 9),
       mode=st.sampled_from(AGG_MODES), layout=st.sampled_from(["right", "left", "holes"]),
       norm_length=st.sampled_from([None, 32]))
def test_matches_reference_and_gradient(seed, B, T, mode, layout, norm_length):
    b = ref.random_batch(seed, B, T, layout=layout)
    loss_mat = b["logprobs"].clone().requires_grad_(True)
    out = agg_loss(loss_mat, b["response_mask"], mode, norm_length=norm_length)
    out.backward()
    mask = b["response_mask"].tolist()
    assert out.item() == pytest.approx(ref.agg(ref.as_lists(b["logprobs"]), mask, mode, None, norm_length),
                                       rel=1e-12, abs=1e-12)
    # d out / d l_bt = w_bt, the reference weight
    w = torch.tensor(ref.agg_weights(mask, mode, None, norm_length), dtype=torch.float64)
    torch.testing.assert_close(loss_mat.grad, w, rtol=1e-14, atol=0.0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6), mode=st.sampled_from(AGG_MODES))
def test_global_denominator_makes_pieces_sum_to_the_whole(seed, k, mode):
    b = ref.random_batch(seed, 6, 7, layout="holes")
    loss_mat, mask = b["logprobs"], b["response_mask"]
    cuts = [i * 6 // k for i in range(k + 1)]
    denominator = sum(count_units(mask[a:c], mode) for a, c in itertools.pairwise(cuts))
    assert denominator == count_units(mask, mode)
    pieces = sum(agg_loss(loss_mat[a:c], mask[a:c], mode, denominator=denominator)
                 for a, c in itertools.pairwise(cuts))
    torch.testing.assert_close(pieces, agg_loss(loss_mat, mask, mode), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_all_masked_is_zero_with_zero_grad(mode, dtype):
    loss_mat = torch.randn(3, 4, dtype=dtype).requires_grad_(True)
    for denominator in (None, 0):
        out = agg_loss(loss_mat, torch.zeros(3, 4, dtype=torch.bool), mode, denominator=denominator)
        out.backward()
        assert out.item() == 0.0 and out.dtype == dtype
        assert torch.equal(loss_mat.grad, torch.zeros_like(loss_mat))


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf])
def test_masked_garbage_does_not_leak(mode, garbage):
    loss_mat = torch.tensor([[1.0, garbage], [garbage, 3.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False], [False, True]])
    out = agg_loss(loss_mat, mask, mode)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(loss_mat.grad).all()
    assert loss_mat.grad[~mask].eq(0).all()


def test_float_mask_and_unknown_mode():
    loss_mat = torch.tensor([[2.0, 4.0]])
    assert agg_loss(loss_mat, torch.tensor([[1.0, 0.0]]), "token-mean").item() == 2.0
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode 'token-sum'.*token-mean"):
        agg_loss(loss_mat, torch.ones(1, 2), "token-sum")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        count_units(torch.ones(1, 2), "sum")
