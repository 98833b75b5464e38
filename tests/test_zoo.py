"""GSPO, CISPO, Clip-Cov and KL-Cov against float64 references; the covariance selection over
the whole mini-batch (micro-batches, and 2 gloo ranks); one real train step each."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from float64_reference import random_batch
from helpers import zoo_reference as zref
from stapo.objectives import TokenStats, build_objective, get_objective, plan_minibatch, policy_loss

SEEDS = range(4)


def run(name, batch, **kw):
    lp = batch["logprobs"].detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(name, lp, batch["old_logprobs"], batch["advantages"], batch["response_mask"], **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def cells(mask: torch.Tensor) -> set:
    return {tuple(x) for x in torch.nonzero(mask).tolist()}


def assert_close(loss, grad, ref_loss, ref_grad):
    assert float(loss) == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def stats_of(batch, rows=slice(None)):
    return TokenStats(batch["logprobs"][rows], None, batch["advantages"][rows], batch["response_mask"][rows],
                      None, batch["old_logprobs"][rows])


# --- float64 references ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("opts", [{}, {"clip_low": 0.2, "clip_high": 0.28, "loss_agg_mode": "token-mean"}])
def test_gspo_matches_reference(seed, opts):
    # log ρ ~ N(0, 0.02²) per token: sequence ratios both inside and outside GSPO's 3e-4 / 4e-4 range
    batch = random_batch(seed, 6, 9, ratio_scale=0.02 if not opts else 0.5, layout="holes")
    loss, grad, metrics = run("gspo", batch, **opts)
    assert_close(loss, grad, *zref.gspo(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                        batch["response_mask"], **opts))
    if not opts:  # GSPO's own range: some sequences clipped, some not
        assert 0 < float(metrics["actor/clip_frac_high"] + metrics["actor/clip_frac_low"]) < 1


@pytest.mark.parametrize("seed", SEEDS)
def test_cispo_matches_reference(seed):
    batch = random_batch(seed, 6, 9, ratio_scale=1.5, token_adv=seed % 2 == 1)  # ρ beyond 5: the weight clips
    loss, grad, metrics = run("cispo", batch)
    assert_close(loss, grad, *zref.cispo(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                         batch["response_mask"]))
    assert float(metrics["actor/clip_frac_high"]) > 0
    # unlike PPO's clip, no valid token with A != 0 loses its gradient
    moving = batch["response_mask"] & (batch["advantages"][:, None] != 0 if seed % 2 == 0 else batch["advantages"] != 0)
    assert bool((grad[moving] != 0).all())


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_cov_matches_reference(seed):
    batch = random_batch(seed, 6, 9, ratio_scale=0.3, layout="holes")
    opts = {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.7}
    penalised = zref.kl_cov_penalised(batch["logprobs"], batch["advantages"], batch["response_mask"], 0.1)
    loss, grad, metrics = run("kl_cov", batch, **opts)
    assert_close(loss, grad, *zref.kl_cov(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                          batch["response_mask"], penalised, 0.7))
    assert float(metrics["kl_cov/penalised"]) == len(penalised) == max(int(0.1 * int(batch["response_mask"].sum())), 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_cov_matches_reference(seed):
    batch = random_batch(seed, 8, 12, ratio_scale=0.3, layout="holes")
    opts = {"clip_cov_ratio": 0.1}
    cands, count = zref.clip_cov_candidates(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                            batch["response_mask"], ratio=0.1)
    assert len(cands) > count > 1, "the case must make the random choice"
    keep = plan_minibatch(get_objective("clip_cov"), get_objective("clip_cov").config(**opts), [stats_of(batch)])
    detached = cells(batch["response_mask"] & ~keep.keep_masks[0])
    assert detached <= cands and len(detached) == count
    loss, grad, metrics = run("clip_cov", batch, keep_mask=keep.keep_masks[0], **opts)
    assert_close(loss, grad, *zref.clip_cov(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                            batch["response_mask"], detached))
    assert float(metrics["clip_cov/detached"]) == count
    # exactly zero gradient at the detached tokens, though most of them would move without Clip-Cov
    for b, t in detached:
        assert grad[b, t].item() == 0.0
    _, plain, _ = run("clip_cov", batch, keep_mask=batch["response_mask"].clone(), **opts)
    assert sum(plain[b, t].item() != 0.0 for b, t in detached) > 0


def test_clip_cov_alone_chooses_from_the_candidates_at_random():
    batch = random_batch(0, 6, 9, ratio_scale=0.3, layout="holes")
    cands, count = zref.clip_cov_candidates(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                            batch["response_mask"], ratio=0.1)
    chosen = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)  # the run's generator: the same state draws the same tokens
        *_, metrics = run("clip_cov", batch, clip_cov_ratio=0.1)
        keep = get_objective("clip_cov").select(get_objective("clip_cov").config(clip_cov_ratio=0.1),
                                               [stats_of(batch)], None)[0]
        chosen.append(cells(batch["response_mask"] & ~keep))
        assert chosen[-1] <= cands and len(chosen[-1]) == count == float(metrics["clip_cov/detached"])
    assert chosen[0] == chosen[1] != chosen[2]


# --- one selection for the whole mini-batch -----------------------------------------------------------

def planned(name, batch, splits, **opts):
    """(the concatenated keep masks, the plan's denominator) with the mini-batch split into ``splits``."""
    objective = build_objective(name, opts)
    rows = len(batch["advantages"])
    bounds = [round(i * rows / splits) for i in range(splits + 1)]
    stats = [stats_of(batch, slice(a, b)) for a, b in itertools.pairwise(bounds)]
    torch.manual_seed(5)
    plan = objective.plan(stats)
    return torch.cat(plan.keep_masks), plan.denominator


@pytest.mark.parametrize("name", ["kl_cov", "clip_cov"])
def test_selection_is_the_same_on_any_split(name):
    batch = random_batch(3, 12, 9, ratio_scale=0.3, layout="holes")
    opts = {"kl_cov": {"kl_cov_ratio": 0.05}, "clip_cov": {"clip_cov_ratio": 0.05}}[name]
    whole, denom = planned(name, batch, 1, **opts)
    for splits in (2, 3, 12):
        keep, d = planned(name, batch, splits, **opts)
        # one rank draws the candidates' priorities in batch order: the very same tokens
        assert torch.equal(keep, whole) and d == denom == int(batch["response_mask"].sum())
    # verl's per-micro-batch choice changes with the split: each micro-batch takes at least one
    micro, _ = planned(name, batch, 3, selection_scope="microbatch", **opts)
    acted = (lambda k: k) if name == "kl_cov" else (lambda k: batch["response_mask"] & ~k)
    assert int(acted(micro).sum()) != int(acted(whole).sum())


@pytest.mark.parametrize("name", ["kl_cov", "clip_cov"])
def test_micro_batch_losses_sum_to_the_whole(name):
    batch = random_batch(1, 12, 9, ratio_scale=0.3, layout="holes")
    opts = {"kl_cov": {"kl_cov_ratio": 0.05}, "clip_cov": {"clip_cov_ratio": 0.05}}[name]
    whole, denom = planned(name, batch, 1, **opts)
    total, grads = 0.0, []
    for rows in (slice(0, 5), slice(5, 12)):
        part = {k: v[rows] for k, v in batch.items()}
        loss, grad, _ = run(name, part, keep_mask=whole[rows], denominator=denom, **opts)
        total, grads = total + float(loss), grads + [grad]
    loss, grad, _ = run(name, batch, keep_mask=whole, **opts)
    assert total == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads), grad, rtol=1e-12, atol=1e-15)


HELPER = Path(__file__).parent / "helpers" / "zoo_ranks.py"


def test_two_gloo_ranks_select_as_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                                             os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(HELPER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads(subprocess.run([sys.executable, str(HELPER), str(tmp_path / "one")], env=env, check=True,
                                    capture_output=True, text=True).stdout)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # KL-Cov: the same penalised tokens; Clip-Cov: the same candidates and count (each rank draws its own)
    assert ranks[0]["kl_cov"] + ranks[1]["kl_cov"] == one["kl_cov"]
    assert ranks[0]["candidates"] + ranks[1]["candidates"] == one["candidates"]
    assert ranks[0]["detached_count"] + ranks[1]["detached_count"] == one["detached_count"] > 1
    assert ranks[0]["denominator"] == ranks[1]["denominator"] == one["denominator"]


# --- one real train step each ------------------------------------------------------------------------

TRAIN_CASES = {
    # every valid token a candidate (wide bounds): half of each mini-batch's tokens detached
    "clip_cov": "{clip_cov_ratio: 0.5, clip_cov_lb: -1.0e9, clip_cov_ub: 1.0e9}",
    "kl_cov": "{kl_cov_ratio: 0.25}",
    "gspo": "{}",
    "cispo": "{}",
}


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_one_train_step(name, tiny_model_dir, tmp_path):
    import test_trainer  # the cheap config of the trainer tests (a module, so its tests are not collected here)
    from stapo.trainer.loop import train

    # two sweeps: the second sees ratios the first step moved (GSPO's clip, CISPO's weight)
    cfg = test_trainer.tiny_cfg(tiny_model_dir, tmp_path, f"objective.name={name}", "steps=1", "optim.ppo_epochs=2",
                                f"objective.options={TRAIN_CASES[name]}")
    step = test_trainer.rows(train(cfg, quiet=True))[-1]
    assert step["train/optimizer_steps"] == 4 and step["actor/grad_norm"] > 0
    if name == "clip_cov":  # ⌊N/2⌋ of each mini-batch's N tokens: about half of each micro-batch's
        assert 0.3 < step["clip_cov/detached_fraction"] < 0.7
    if name == "kl_cov":
        # k·N of the mini-batch with a learning signal; none where every advantage is 0 (Cov ties at 0)
        assert step["kl_cov/penalised"] > 0 and 0 < step["kl_cov/penalised_fraction"] < 0.5
    if name == "gspo":  # in the second sweep sequence ratios leave GSPO's 3e-4 / 4e-4 range
        assert step["actor/clip_frac_high"] + step["actor/clip_frac_low"] > 0
    if name == "cispo":  # ρ moved (approx_kl > 0) but stays far below the weight's cap of 5
        assert step["actor/approx_kl"] > 0 and step["actor/clip_frac_high"] == 0
