"""DGG (Dynamic Gradient Gating, arXiv 2605.19425): the z-score, the lm_head gradient probe,
the veto inside ``update_policy``, and the trainer with ``reuse:`` (identity, resume, DDP/FSDP2).

Run as a script under torchrun, this file is also the distributed worker (``_worker``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stapo.config import ConfigError, build_config
from stapo.objectives.training import objective_from_config
from stapo.reuse import FIRST_GATED_PASS, HeadGradProbe, SlidingZScore, make_gate, should_veto, zscore

# --- the statistic -----------------------------------------------------------------------------


def test_zscore_hand_worked():
    # h = [1, 2, 3, 4]: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    # x = 5: z = 2.5 / sqrt(5/3) = 1.9364916731...
    assert zscore(5.0, [1.0, 2.0, 3.0, 4.0], eps=0.0) == pytest.approx(2.5 / math.sqrt(5 / 3), rel=1e-15)
    h = [0.31, 0.29, 0.35, 0.30, 0.33, 0.28, 0.32, 0.30]
    ref = (0.9 - statistics.fmean(h)) / (statistics.stdev(h) + 1e-8)
    assert zscore(0.9, h, eps=1e-8) == pytest.approx(ref, rel=1e-12)
    assert zscore(1.0, [1.0, 1.0], eps=1e-8) == 0.0  # constant window, no change: z stays finite
    with pytest.raises(ValueError, match="history"):
        zscore(1.0, [1.0], eps=1e-8)


def test_window_scores_norm_and_increment_leave_one_out():
    w = SlidingZScore(window=3, statistic="norm")
    for g in (1.0, 2.0):
        assert w.score(g) is None  # not full yet
        w.push(g)
    w.push(3.0)
    assert w.full and w.score(10.0) == pytest.approx((10.0 - 2.0) / (1.0 + 1e-8))  # against [1, 2, 3] only
    w.push(10.0)
    assert list(w.values) == [2.0, 3.0, 10.0]  # the oldest left

    inc = SlidingZScore(window=2, statistic="increment")
    inc.push(1.0)  # no increment before the first step
    assert list(inc.values) == [] and inc.value(4.0) == 3.0
    inc.push(2.0)
    inc.push(4.0)  # increments 1, 2
    assert inc.score(7.0) == pytest.approx((3.0 - 1.5) / (math.sqrt(0.5) + 1e-8))
    restored = SlidingZScore(window=2, statistic="increment")
    restored.load_state_dict(json.loads(json.dumps(inc.state_dict())))  # the trainer state is JSON
    assert restored.score(7.0) == inc.score(7.0) and restored.last_g == 4.0
    with pytest.raises(ValueError, match="window"):
        SlidingZScore(window=1)


def test_veto_rule_and_a_synthetic_spike():
    w = SlidingZScore(window=8)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):  # a steady lm_head signal with 5% noise
        w.push(1.0 + 0.05 * float(torch.randn((), generator=g)))
    spike, steady = w.score(3.0), w.score(1.0)
    assert spike > 10 and abs(steady) < 2
    assert should_veto(spike, pass_number=FIRST_GATED_PASS, threshold=0.5)
    assert not should_veto(spike, pass_number=1, threshold=0.5), "pass 1 is on-policy: never vetoed"
    assert not should_veto(None, pass_number=3, threshold=0.5), "window not full: never vetoed"
    assert not should_veto(0.5, pass_number=2, threshold=0.5), "z must exceed τ strictly"


# --- the lm_head gradient ----------------------------------------------------------------------


def _untied_copy(model):
    """The same function with its own head matrix: the reference for the head-only gradient."""
    u = copy.deepcopy(model)
    u.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    u.config.tie_word_embeddings = False
    return u


def _two_microbatch_backward(model, fast, probe=None):
    from stapo.ops import model_token_stats

    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)  # [B, L]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    weights = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)  # [T]: a signed per-token "advantage"
    for rows in (slice(0, 2), slice(2, 4)):  # gradient accumulation over two micro-batches
        out = model_token_stats(model, ids[rows], mask[rows], 5, fast=fast)
        loss = (out.logprobs * weights).sum()
        if probe is not None:
            probe.track(loss)
        loss.backward()


@pytest.mark.parametrize("fast", [True, False], ids=["fused_head", "logits_path"])
def test_probe_isolates_the_output_projection_of_a_tied_matrix(fast):
    from stapo.models.tiny import tiny_qwen3

    torch.manual_seed(0)
    model = tiny_qwen3(64).double()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    probe = HeadGradProbe(model)
    assert probe.tied
    _two_microbatch_backward(model, fast, probe)
    g = probe.squared_norm()
    hooked = model.lm_head.weight.grad.clone()
    _two_microbatch_backward(model, fast)
    assert torch.equal(hooked, model.lm_head.weight.grad), "the probe changed the gradient"

    ref = _untied_copy(model)
    _two_microbatch_backward(ref, fast)
    head_only = float(ref.lm_head.weight.grad.pow(2).sum())
    mixed = float(model.lm_head.weight.grad.pow(2).sum())
    assert g == pytest.approx(head_only, rel=1e-12)
    assert abs(mixed - head_only) > 0.1 * head_only, "the tied .grad would have been a different signal"
    assert probe.squared_norm() == 0.0, "the buffer is per optimizer step"

    untied = HeadGradProbe(ref)
    assert not untied.tied
    _two_microbatch_backward(ref, fast, untied)
    assert untied.squared_norm() == pytest.approx(head_only, rel=1e-12)


# --- the veto inside update_policy ------------------------------------------------------------


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    """A real rollout batch of the tiny model: 4 prompts × 4 samples (fp32: the tests compare bits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.rollout import HFGenerator, SamplingConfig, collate_rollouts
    from stapo.trainer.phases import attach_advantages, compute_old_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, _make_batch(model, tok, attach_advantages, compute_old_logprobs, HFGenerator, SamplingConfig,
                              collate_rollouts)


def _make_batch(model, tok, attach_advantages, compute_old_logprobs, HFGenerator, SamplingConfig, collate):
    prompts = [tok(f"Compute {a} + {b}.")["input_ids"] for a, b in [(1, 2), (30, 4), (55, 61), (7, 70)]]
    gens = HFGenerator(model, tok).generate(prompts, SamplingConfig(max_new_tokens=10, n=4, seed=3))
    batch = collate(list("abcd"), prompts, gens, tok.pad_token_id)
    batch.rewards = torch.tensor([float(len(t) % 3 == 0) for t in batch.response_texts])
    batch = attach_advantages(batch, 4, "grpo")
    batch = batch.with_rollout_stats(compute_old_logprobs(model, batch, 1.0, 4, "cpu", with_collision=False))
    return batch


def _cfg(*extra, objective="stapo"):
    options = "{prob_threshold: 0.3}" if objective == "stapo" else "{}"
    return build_config(None, [f"objective.name={objective}", f"objective.options={options}",
                               "rollout.prompts_per_step=4", "rollout.n=4", "optim.mini_batch_prompts=2",
                               "optim.micro_batch_size=3", *extra])


def _update(model, batch, cfg, gate_window=None, lr=1e-3):
    """One ``update_policy`` from a copy of ``model`` with AdamW; (model, optimizer, metrics)."""
    from stapo.trainer.phases import update_policy

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    gate = make_gate(cfg.reuse, m)
    if gate_window is not None:
        gate.load_state_dict({"window": {"values": gate_window, "last_g": gate_window[-1]}})
    metrics = update_policy(m, opt, batch, cfg, "cpu", params_fresh=True, gate=gate,
                            objective=objective_from_config(cfg)).metrics
    return m, opt, metrics


def _same_state(a, b) -> bool:
    pa, pb = dict(a[0].named_parameters()), dict(b[0].named_parameters())
    if any(not torch.equal(pa[k], pb[k]) for k in pa):
        return False
    sa, sb = a[1].state_dict()["state"], b[1].state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])) for i in sa for k in sa[i])


def test_a_vetoed_step_leaves_adam_and_the_weights_untouched(rollout):
    model, batch = rollout
    # a window of tiny past values makes the real lm_head gradient a spike. One mini-batch a
    # pass (M = P) and a small lr, so g2 ≈ g1: after pass 1 the window is [t × 7, g1] and
    # z(g2) ≈ (g2 − g1/8) / (0.354·g1) ≈ 2.5 > τ = 0.5 on pass 2
    quiet, one_mb = [1e-9] * 8, "optim.mini_batch_prompts=4"
    plain = _update(model, batch, _cfg(one_mb), lr=1e-5)  # gate none: one pass, one optimizer step
    gated = _update(model, batch, _cfg(one_mb, "reuse.gate=dgg", "reuse.max_reuse=3"), quiet, lr=1e-5)
    fixed = _update(model, batch, _cfg(one_mb, "reuse.gate=fixed", "reuse.max_reuse=3"), quiet, lr=1e-5)
    m = gated[2]
    assert m["reuse/gate_triggers"] == 1 and m["reuse/passes"] == 1 and m["train/optimizer_steps"] == 1
    assert m["reuse/z"] > 2
    assert _same_state(gated, plain), "the vetoed step changed the weights or Adam's moments"
    # the same window under "fixed" only observes: all 3 passes step, so the veto mattered
    assert fixed[2]["train/optimizer_steps"] == 3 and fixed[2]["reuse/gate_triggers"] == 0
    assert fixed[2]["reuse/z"] >= m["reuse/z"], "fixed observes the same z at pass 2 (and pass 3's)"
    assert not _same_state(fixed, plain)


def test_k1_gates_and_fixed_reuse_are_the_plain_update(rollout):
    model, batch = rollout
    plain = _update(model, batch, _cfg())
    for gate in ("fixed", "dgg"):  # one pass: the probe's hooks and the window change nothing
        k1 = _update(model, batch, _cfg(f"reuse.gate={gate}", "reuse.max_reuse=1", "reuse.window=2"))
        assert _same_state(k1, plain), gate
        assert k1[2]["reuse/passes"] == 1 and k1[2]["reuse/gate_triggers"] == 0
        assert {k: v for k, v in k1[2].items() if not k.startswith("reuse/")} == plain[2]
    # a pass is ppo_epochs sweeps: fixed K = 2 is exactly two PPO epochs, bit for bit
    two_epochs = _update(model, batch, _cfg("optim.ppo_epochs=2"))
    fixed2 = _update(model, batch, _cfg("reuse.gate=fixed", "reuse.max_reuse=2"))
    assert _same_state(fixed2, two_epochs) and fixed2[2]["reuse/passes"] == 2
    assert two_epochs[2]["train/optimizer_steps"] == 4


def test_reuse_config_errors():
    with pytest.raises(ConfigError, match="reuse.gate"):
        build_config(None, ["reuse.gate=always"])
    with pytest.raises(ConfigError, match="reuse.max_reuse"):
        build_config(None, ["reuse.max_reuse=0"])
    with pytest.raises(ConfigError, match="reuse.window"):
        build_config(None, ["reuse.window=1"])
    with pytest.raises(ConfigError, match="reuse.statistic"):
        build_config(None, ["reuse.statistic=variance"])
    with pytest.raises(ConfigError, match="LoRA"):
        build_config(None, ["reuse.gate=dgg", "model.lora.r=8"])
    cfg = build_config(None, ["reuse.gate=dgg"])
    assert (cfg.reuse.max_reuse, cfg.reuse.z_threshold, cfg.reuse.window) == (4, 0.5, 8)  # the defaults


# --- the trainer -------------------------------------------------------------------------------


def _train_rows(tiny_model_dir, out, *extra, resume=None, steps=2):
    from stapo.trainer.loop import train
    from test_trainer import rows, tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, out, f"steps={steps}", "data.heldout=null", "save_every=2", *extra)
    run = train(cfg, resume=resume, quiet=True)
    return run, rows(run)


def _weights(run_dir):
    from safetensors.torch import load_file

    from stapo.trainer.checkpoint import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "policy" / "model.safetensors"))


def _core(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "reward/seconds", "reuse/"))}


@pytest.fixture
def no_plots(monkeypatch):
    """The run's PNG plots are not under test and cost seconds of matplotlib per run."""
    import stapo.trainer.plots

    monkeypatch.setattr(stapo.trainer.plots, "plot_run", lambda run_dir: None)


@pytest.mark.slow
def test_trainer_gate_none_is_the_plain_trainer_and_k1_equals_none(tiny_model_dir, tmp_path, no_plots):
    plain, plain_rows = _train_rows(tiny_model_dir, tmp_path / "plain")
    none, none_rows = _train_rows(tiny_model_dir, tmp_path / "none", "reuse.gate=none", "reuse.max_reuse=4")
    assert [_core(r) for r in none_rows] == [_core(r) for r in plain_rows]
    assert not any(k.startswith("reuse/") for r in none_rows for k in r), "gate none logs like the plain trainer"
    w = _weights(plain)
    assert all(torch.equal(w[k], v) for k, v in _weights(none).items())
    for gate in ("fixed", "dgg"):
        run, got = _train_rows(tiny_model_dir, tmp_path / gate, f"reuse.gate={gate}", "reuse.max_reuse=1",
                               "reuse.window=2")
        assert [_core(r) for r in got] == [_core(r) for r in plain_rows], gate
        assert all(torch.equal(w[k], v) for k, v in _weights(run).items()), gate
        assert [r["reuse/passes"] for r in got[1:]] == [1, 1] and got[-1]["reuse/lm_head_grad_sq"] > 0


@pytest.mark.slow
def test_trainer_dgg_resume_is_exact(tiny_model_dir, tmp_path, no_plots):
    # W = 8 > the 6 optimizer steps a batch can take (2 a pass, K = 3): every z of steps 3-4 reads
    # values of earlier batches, so a resume that lost the window would score differently (or not at all)
    gate = ["reuse.gate=dgg", "reuse.max_reuse=3", "reuse.window=8", "reuse.statistic=increment",
            "reuse.z_threshold=0.0"]
    _, straight = _train_rows(tiny_model_dir, tmp_path / "a", *gate, steps=4)
    first, _ = _train_rows(tiny_model_dir, tmp_path / "b", *gate, steps=2)
    _, resumed = _train_rows(tiny_model_dir, tmp_path / "b", *gate, steps=4, resume=first)
    strip = [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "reward/seconds"))}
             for r in straight]
    assert strip == [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "reward/seconds"))}
                     for r in resumed]
    assert all("reuse/z" in r for r in straight[3:]), "the resumed steps must have been scored"
    assert sum(r["reuse/gate_triggers"] for r in straight[1:]) >= 1, "τ = 0 vetoes some step in 4"


# --- DDP / FSDP2 ------------------------------------------------------------------------------

def _torchrun() -> list[str]:
    # a free port of our own: with --master-port 0 torchrun 2.13 hands its workers MASTER_PORT=0,
    # and their store clients can wait for a connection that never comes
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]


def _run_worker(launcher: list[str], model_dir, out: Path, strategy: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*launcher, __file__, str(model_dir), str(out), strategy], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    return {int(p.stem[4:]): (json.loads(p.read_text()), load_file(str(p.with_suffix(".safetensors"))))
            for p in out.glob("rank*.json")}


@pytest.fixture(scope="module")
def single_process_gate(tiny_model_dir, tmp_path_factory):
    return _run_worker([sys.executable], tiny_model_dir, tmp_path_factory.mktemp("dgg_single"), "none")[0]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_gate_on_the_global_gradient(strategy, single_process_gate, tiny_model_dir, tmp_path):
    ranks = _run_worker(_torchrun(), tiny_model_dir, tmp_path, strategy)
    assert sorted(ranks) == [0, 1] and ranks[0][0] == ranks[1][0], "the ranks disagree on g, z or the veto"
    for head in ("tied", "untied"):
        single, got = single_process_gate[0][head], ranks[0][0][head]
        assert single["reuse/gate_triggers"] == got["reuse/gate_triggers"] == 1
        for key in ("reuse/lm_head_grad_sq", "reuse/z"):
            assert got[key] == pytest.approx(single[key], rel=1e-9), (head, key)
        ref, upd = single_process_gate[1][head], ranks[0][1][head]
        assert torch.equal(upd, ranks[1][1][head]), "the ranks hold different weights"
        assert ref.norm() > 0 and float((upd - ref).norm() / ref.norm()) < 1e-9, head


def _worker(model_dir: str, out_dir: str, strategy: str) -> None:
    """One rank (or the single process for "none"): dgg with a quiet window on this rank's share of
    a fixed rollout batch, for a tied and an untied head; writes the gate's metrics and the update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.distributed import init_distributed, shutdown, unwrap, wrap_model
    from stapo.rollout import HFGenerator, SamplingConfig, collate_rollouts
    from stapo.trainer.phases import attach_advantages, compute_old_logprobs, update_policy

    torch.set_num_threads(1)
    ctx = init_distributed(strategy, "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = _cfg("optim.mini_batch_prompts=4", "optim.grad_clip=1e9", "reuse.gate=dgg", "reuse.max_reuse=3",
               f"parallel.strategy={strategy}")
    results, updates = {}, {}
    for head in ("tied", "untied"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        model = model if head == "tied" else _untied_copy(model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        batch = _make_batch(model, tok, attach_advantages, compute_old_logprobs, HFGenerator, SamplingConfig,
                            collate_rollouts)  # the same global batch on every rank (same seed)
        share = len(batch) // ctx.world_size
        batch = batch.select(slice(ctx.rank * share, (ctx.rank + 1) * share))
        model = wrap_model(model, ctx, torch.device("cpu"))
        gate = make_gate(cfg.reuse, model)
        assert gate.probe.tied == (head == "tied")
        # a quiet window: pass 2's g is a spike and is vetoed. SGD makes the update −lr·grad, so an
        # error in the global gradient would show; a small lr keeps g2 ≈ g1
        gate.load_state_dict({"window": {"values": [1e-9] * 8, "last_g": 1e-9}})
        metrics = update_policy(model, torch.optim.SGD(model.parameters(), lr=1e-4), batch, cfg, "cpu",
                                params_fresh=True, ctx=ctx, gate=gate, objective=objective_from_config(cfg)).metrics
        if strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            after = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            after = unwrap(model).state_dict()
        updates[head] = torch.cat([(after[k].detach() - before[k]).flatten() for k in sorted(before) if k in after])
        results[head] = {k: v for k, v in metrics.items() if k.startswith("reuse/")}
    from safetensors.torch import save_file

    (Path(out_dir) / f"rank{ctx.rank}.json").write_text(json.dumps(results, sort_keys=True))
    save_file(updates, str(Path(out_dir) / f"rank{ctx.rank}.safetensors"))
    shutdown(ctx)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
