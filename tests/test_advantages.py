"""Group-relative advantages vs a float64 loop reference (``float64_reference.group_advantages``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import float64_reference as ref
from stapo.advantages import ADVANTAGE_METHODS, group_advantages

METHODS = ("grpo", "dr_grpo", "rloo")


def test_hand_worked():
    # one group of G = 4 with rewards [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(4·0.25/3) = 1/sqrt(3)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    s = 3 ** -0.5
    torch.testing.assert_close(group_advantages(r, 4, "grpo"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (s + 1e-6))
    torch.testing.assert_close(group_advantages(r, 4, "dr_grpo"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64))
    # leave-one-out: 1 − mean(0, 0, 1) = 2/3;  0 − mean(1, 0, 1) = −2/3
    torch.testing.assert_close(group_advantages(r, 4, "rloo"),
                               torch.tensor([2, -2, -2, 2], dtype=torch.float64) / 3)


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(METHODS), groups=st.integers(1, 5), G=st.integers(2, 8),
       rewards=st.data(), binary=st.booleans())
def test_matches_loop_reference(method, groups, G, rewards, binary):
    elems = st.sampled_from([0.0, 1.0]) if binary else st.floats(-10, 10, allow_nan=False)
    r = rewards.draw(st.lists(elems, min_size=groups * G, max_size=groups * G))
    got = group_advantages(torch.tensor(r, dtype=torch.float64), G, method)
    assert got.dtype == torch.float64 and got.shape == (groups * G,)
    want = torch.tensor(ref.group_advantages(r, G, method), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.7, -3.7])
def test_constant_group_is_exactly_zero(method, value):
    # 0.7 is not exact in binary: the mean of three 0.7s is off by an ulp (r − mean ≈ 1e-16, and grpo's
    # 1/(std + 1e-6) would blow that up to ~1e-10) — the result must still be exactly 0
    r = torch.tensor([value] * 3 + [0.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(r, 3, method)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=torch.float64))
    assert adv[3:].abs().min() > 0


def test_dtypes():
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2, "grpo").dtype == torch.float32  # int rewards
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float32), 2, "grpo").dtype == torch.float32
    assert group_advantages([1.0, 0.0, 0.5, 0.5], 2, "dr_grpo").tolist() == [0.5, -0.5, 0.0, 0.0]
    # G = 1 is allowed for grpo / dr_grpo: every group is constant -> 0
    assert group_advantages(torch.tensor([3.0, 1.0]), 1, "grpo").tolist() == [0.0, 0.0]


def test_errors():
    assert set(ADVANTAGE_METHODS) == set(METHODS)
    with pytest.raises(ValueError, match=r"5 rewards is not a multiple of group_size=2"):
        group_advantages(torch.zeros(5), 2, "grpo")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0, "grpo")
    with pytest.raises(ValueError, match=r"rloo needs group_size >= 2"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match=r"unknown advantage method 'ppo'.*grpo"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2, "grpo")
