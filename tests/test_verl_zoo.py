"""stapo's gspo / cispo / kl_cov / clip_cov against verl 0.9.1's own ``core_algos`` (`make test-verl`).

The same float64 tensors go through verl's registered policy loss (``get_policy_loss_fn``, verl's
``agg_loss``) and through ``stapo.policy_loss`` with the matching options: loss and d loss / d log π agree.
Skipped where verl is not installed, unless STAPO_REQUIRE_VERL=1 (as tests/test_verl_loss.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("STAPO_REQUIRE_VERL") == "1":
    import verl  # noqa: F401  fail loudly: the test target promised a working verl
else:
    pytest.importorskip("verl")

from verl.trainer.ppo import core_algos

import stapo
from helpers.verl_engine import actor_config

pytestmark = pytest.mark.verl
B, T = 6, 11
SEEDS = [0, 1, 2]
ATOL = 1e-12  # float64 on both sides: the same formula, summed in a different order at most


def batch(seed: int, adv_scale: float = 1.0, spread: float = 0.3):
    """Random right-padded [B, T] float64 rollouts: log π a leaf, log π_old near it, ± per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = (adv_scale * torch.randn(B, 1, generator=g, dtype=torch.float64)).expand(B, T).clone()
    return logp, old, adv, mask


def verl_config(mode: str, *overrides: str):
    config = actor_config(f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}", *overrides)
    config.global_batch_info.clear()  # a single rank, the whole batch: agg_loss's own counts
    config.global_batch_info["dp_size"] = 1
    return config


def verl_side(mode, config, logp, old, adv, mask, agg):
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = core_algos.get_policy_loss_fn(mode)(old_log_prob=old, log_prob=leaf, advantages=adv,
                                                        response_mask=mask.double(), loss_agg_mode=agg,
                                                        config=config, rollout_is_weights=None)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def stapo_side(name, logp, old, adv, mask, **opts):
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = stapo.policy_loss(name, leaf, old, adv, mask, kl_coef=0.0, **opts)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def assert_parity(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gspo_matches_verl(seed, agg):
    logp, old, adv, mask = batch(seed, spread=0.02)  # near-on-policy: some sequences clipped, some not
    config = verl_config("gspo", "actor_rollout_ref.actor.clip_ratio_low=0.003",
                         "actor_rollout_ref.actor.clip_ratio_high=0.004")
    theirs = verl_side("gspo", config, logp, old, adv, mask, agg)
    ours = stapo_side("gspo", logp, old, adv, mask, clip_low=0.003, clip_high=0.004, loss_agg_mode=agg)
    if agg == "seq-mean-token-mean":
        # verl divides each sequence's token sum by (|o_i| + 1e-8): a ~1e-9 relative difference by design
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-7, atol=0)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-7, atol=1e-15)
    else:
        assert_parity(ours, theirs)
    assert 0 < theirs[2]["actor/pg_clipfrac"] < 1  # the clip acts on part of the batch


@pytest.mark.parametrize("seed", SEEDS)
def test_cispo_matches_verl(seed):
    logp, old, adv, mask = batch(seed, spread=0.8)  # far from on-policy: the weight is clipped on both sides
    config = verl_config("cispo", "actor_rollout_ref.actor.clip_ratio_low=0.2",
                         "actor_rollout_ref.actor.clip_ratio_high=0.28")
    theirs = verl_side("cispo", config, logp, old, adv, mask, "token-mean")
    ours = stapo_side("cispo", logp, old, adv, mask, clip_low=0.2, clip_high=0.28, loss_agg_mode="token-mean")
    assert_parity(ours, theirs)
    assert 0 < theirs[2]["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_kl_cov_matches_verl(seed, ratio):
    logp, old, adv, mask = batch(seed)
    config = verl_config("kl_cov", f"actor_rollout_ref.actor.policy_loss.kl_cov_ratio={ratio}",
                         "actor_rollout_ref.actor.policy_loss.ppo_kl_coef=0.7")
    theirs = verl_side("kl_cov", config, logp, old, adv, mask, "token-mean")
    ours = stapo_side("kl_cov", logp, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=0.7,
                      selection_scope="microbatch", loss_agg_mode="token-mean")
    assert_parity(ours, theirs)
    assert float(ours[2]["kl_cov/penalised"]) == max(int(ratio * int(mask.sum())), 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_cov_matches_verl_when_every_candidate_is_chosen(seed):
    """clip_cov_ratio 1: verl's random permutation keeps every candidate, so no randomness is left."""
    logp, old, adv, mask = batch(seed, adv_scale=3.0)
    lb, ub = 0.2, 3.0
    config = verl_config("clip_cov", "actor_rollout_ref.actor.clip_ratio=0.2",
                         "actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.28",
                         "actor_rollout_ref.actor.policy_loss.clip_cov_ratio=1.0",
                         f"actor_rollout_ref.actor.policy_loss.clip_cov_lb={lb}",
                         f"actor_rollout_ref.actor.policy_loss.clip_cov_ub={ub}")
    theirs = verl_side("clip_cov", config, logp, old, adv, mask, "token-mean")
    ours = stapo_side("clip_cov", logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_cov_ratio=1.0,
                      clip_cov_lb=lb, clip_cov_ub=ub, selection_scope="microbatch", loss_agg_mode="token-mean")
    assert_parity(ours, theirs)
    detached = float(ours[2]["clip_cov/detached"])
    assert 0 < detached < int(mask.sum())  # the selection does something, and not everything
    # verl's masked_mean divides by (count + 1e-8)
    assert theirs[2]["actor/pg_clipfrac"] == pytest.approx(detached / int(mask.sum()), rel=1e-8)
    assert torch.all(ours[1][mask & (theirs[1] == 0)] == 0)
