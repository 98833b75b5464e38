"""Data-parallel invariance of loss_mode=stapo in verl: 2 gloo processes == 1 process (`make test-verl`).

Each rank holds half of the mini-batch; the hook's τ_h is taken over the candidates of both ranks
and the loss is divided by the kept tokens of both, so the averaged gradient equals stapo's
whole-batch gradient, for fixed and dynamic (token-budget) micro-batches.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

if os.environ.get("STAPO_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

from safetensors.torch import load_file

import stapo
from helpers.verl_dp import run_rank
from helpers.verl_engine import dp_model_and_data, padded_stats
from stapo.objectives import s2t_mask, s2t_threshold

pytestmark = [pytest.mark.verl, pytest.mark.slow]
OPTS = {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("split", [{"micro_batch_size": 2}, {"max_token_len": 20}])
def test_two_ranks_equal_one_process(tmp_path, split):
    model, data = dp_model_and_data()
    lp, ent = padded_stats(model, data)
    mask, adv = data["response_mask"].bool(), data["advantages"]
    tau_p = float(lp.detach()[mask & (adv > 0)].median().exp())
    loss, _ = stapo.policy_loss("stapo", lp, data["old_log_probs"], adv, mask, entropy=ent,
                                prob_threshold=tau_p, **OPTS)
    loss.backward()
    reference = {k: p.grad for k, p in model.named_parameters()}

    # the test can fail: with each rank's own τ_h the silenced tokens would differ
    halves = [slice(0, 4), slice(4, 8)]  # the ranks' rows
    quads = [(lp.detach()[h], ent.detach()[h], adv[h], mask[h]) for h in halves]
    whole = s2t_threshold(quads, tau_p)
    assert any(not torch.equal(s2t_mask(*q, tau_p), s2t_mask(*q, tau_p, entropy_threshold=whole)) for q in quads)

    torch.multiprocessing.start_processes(run_rank, args=(2, _free_port(), str(tmp_path), tau_p, split), nprocs=2,
                                          start_method="spawn")
    for rank in range(2):
        grads = load_file(tmp_path / f"rank{rank}.safetensors")
        assert max((grads[k] - reference[k]).abs().max().item() for k in reference) < 1e-6
