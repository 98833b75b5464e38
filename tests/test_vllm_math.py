"""Rollout-vs-trainer corrections of the vLLM backend: mismatch metric and TIS weights.

Pure torch, no vLLM needed: runs in the main environment and under `make test-vllm`.
References are float64 element-by-element loops.
"""

import math

import pytest
import torch

from stapo.objectives import rollout_mismatch, tis_weights


def _batch(seed, b=4, t=7):
    g = torch.Generator().manual_seed(seed)
    train = -torch.rand(b, t, generator=g, dtype=torch.float64) * 5  # [B, T] log-probs ≤ 0
    rollout = train + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[0, 0] = True  # never empty
    return train, rollout, mask


@pytest.mark.parametrize("seed", range(5))
def test_mismatch_matches_float64_loop(seed):
    train, rollout, mask = _batch(seed)
    diffs = [abs(train[i, j].item() - rollout[i, j].item())
             for i in range(train.shape[0]) for j in range(train.shape[1]) if mask[i, j]]
    out = rollout_mismatch(train, rollout, mask)
    assert out["rollout/logprob_diff_mean"].item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert out["rollout/logprob_diff_max"].item() == pytest.approx(max(diffs), rel=1e-6)


def test_mismatch_ignores_padding_garbage_and_is_detached():
    train, rollout, mask = _batch(0)
    clean = rollout_mismatch(train, rollout, mask)
    train_g = train.clone().requires_grad_(True)
    dirty_rollout = rollout.clone()
    dirty_rollout[~mask] = float("nan")
    dirty_rollout[~mask & (torch.arange(7) % 2 == 0)] = float("-inf")
    out = rollout_mismatch(train_g, dirty_rollout, mask)
    for key in clean:
        assert out[key].item() == clean[key].item()
        assert not out[key].requires_grad


def test_mismatch_empty_mask_is_zero_and_shapes_checked():
    train, rollout, mask = _batch(1)
    out = rollout_mismatch(train, rollout, torch.zeros_like(mask))
    assert out["rollout/logprob_diff_mean"].item() == 0.0
    assert out["rollout/logprob_diff_max"].item() == 0.0
    with pytest.raises(ValueError, match="response_mask"):
        rollout_mismatch(train, rollout, mask[:, :-1])


@pytest.mark.parametrize("cap", [0.5, 1.0, 2.0, 10.0])
def test_tis_weights_match_float64_loop(cap):
    train, rollout, _ = _batch(2)
    rollout = train + torch.randn(train.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = tis_weights(train, rollout, cap)
    assert w.shape == train.shape and w.dtype == torch.float64
    for i in range(train.shape[0]):
        for j in range(train.shape[1]):
            ratio = math.exp(train[i, j].item()) / math.exp(rollout[i, j].item())
            assert w[i, j].item() == pytest.approx(min(ratio, cap), rel=1e-12)


def test_tis_weights_are_constants_for_autograd():
    """The weight multiplies the per-token loss but is not differentiated (verl detaches it):
    d/dθ Σ w·ℓ must equal Σ w·dℓ/dθ."""
    train, rollout, mask = _batch(4)
    logp = train.clone().requires_grad_(True)
    w = tis_weights(logp, rollout, cap=2.0, response_mask=mask)
    assert not w.requires_grad
    (w * logp).sum().backward()
    torch.testing.assert_close(logp.grad, w, rtol=0, atol=0)
    # and gradcheck of the weighted loss in float64: the weight enters as a constant
    torch.autograd.gradcheck(lambda x: (tis_weights(train, rollout, 2.0) * x).sum(), (logp.detach().clone().requires_grad_(),))


def test_tis_weights_extremes_and_padding():
    train = torch.tensor([[0.0, -1e4, 0.0, -3.0]])
    rollout = torch.tensor([[-1e4, 0.0, float("-inf"), float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    w = tis_weights(train, rollout, cap=3.0, response_mask=mask)
    assert w[0, 0].item() == pytest.approx(3.0)  # exp(1e4) would overflow; truncated to the cap
    assert w[0, 1].item() == 0.0
    assert w[0, 2].item() == pytest.approx(3.0)  # rollout said impossible: ratio ∞, capped
    assert w[0, 3].item() == 1.0  # padding: neutral, NaN gone
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan")])
def test_tis_weights_reject_bad_cap(cap):
    train, rollout, _ = _batch(5)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(train, rollout, cap)


def test_tis_flows_forward_and_leaves_the_batch_alone():
    """TIS returns a new batch with [B, T] advantages = A × w; the rollout batch keeps its [B] ones."""
    from stapo.batch import RolloutBatch
    from stapo.trainer.phases import correct_rollout_engine

    train, rollout, mask = _batch(3)
    b, t = train.shape
    adv = torch.linspace(-1, 1, b, dtype=torch.float64)  # [B]
    batch = RolloutBatch(prompt_ids=torch.zeros(b, 2, dtype=torch.long), prompt_mask=torch.ones(b, 2, dtype=torch.bool),
                         response_ids=torch.zeros(b, t, dtype=torch.long), response_mask=mask,
                         group_ids=torch.arange(b), truncated=torch.zeros(b, dtype=torch.bool),
                         response_lengths=torch.full((b,), t), advantages=adv.clone(),
                         old_logprobs=train, rollout_logprobs=rollout)
    out, metrics = correct_rollout_engine(batch, 2.0)
    assert out is not batch and torch.equal(batch.advantages, adv)  # input untouched, still [B]
    w = tis_weights(train, rollout, 2.0, mask)
    assert out.advantages.shape == (b, t) and torch.equal(out.advantages, adv[:, None] * w)
    assert metrics["rollout/tis_weight_mean"] == pytest.approx(float(w[mask].mean()))
    same, none = correct_rollout_engine(batch, None)
    assert same is batch and none == {}
