"""STAPOTrainer inside real TRL (1.16) on a tiny local Qwen3, CPU only.

- parity: S2T off, or τ_p = 0, trains exactly like GRPOTrainer (losses and weights);
- silencing: silenced tokens get exactly zero gradient under every TRL loss_type, and the dapo
  loss equals ``stapo.policy_loss("stapo")`` on the same tensors (kept tokens in numerator and
  denominator, TRL issue 6369);
- scope: τ_h over all accumulation micro-batches of an optimizer step (the 2-process run is in
  test_trl_multiprocess.py), and the reduced "segment" scope when a step spans generations;
- config / version / compatibility errors, PEFT, evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from stapo.integrations import trl as stapo_trl
from stapo.integrations.trl import (
    STAPOConfig,
    STAPOTrainer,
    check_trl_version,
    segment_length,
    threshold_scope,
)
from stapo.objectives import policy_loss, quantile, s2t_candidates, s2t_mask
from trl_common import (
    BASE,
    HIGH_PROB_THRESHOLD,
    RecordingTrainer,
    digit_fraction,
    prompts,
    tiny_model_and_tok,
)

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the model is tiny: one intra-op thread is ~5x faster than two on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(cls=STAPOConfig, **overrides):
    # save_strategy="no": nothing is written there
    return cls(output_dir=os.path.join(tempfile.gettempdir(), "stapo-trl-tests"), **{**BASE, **overrides})


def _train(trainer_cls, config):
    model, tok = tiny_model_and_tok()
    trainer = trainer_cls(model=model, reward_funcs=digit_fraction, args=config, train_dataset=prompts(),
                          processing_class=tok)
    trainer.train()
    return trainer, model


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)


def _assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6):
    scale = b.abs().max().clamp(min=1e-12)
    assert float((a - b).abs().max() / scale) <= rel


# --- parity ---------------------------------------------------------------------------------------


def test_parity_with_grpo_trainer_when_s2t_is_off_or_tau_p_is_zero():
    # 3 optimizer steps of 2 accumulation micro-batches each: the window logic and the replaced
    # num_items_in_batch are both on the path, and must change nothing when nothing is silenced.
    # TRL's own forward scores the tokens (stapo_token_stats=False): stapo's op agrees with it to
    # rounding only (test_stapo_token_stats_match_trl_forward), which Adam amplifies past 1e-6.
    common = {"max_steps": 3, "gradient_accumulation_steps": 2, "stapo_token_stats": False}
    vanilla, w_ref = _train(GRPOTrainer, _config(GRPOConfig, **{k: v for k, v in common.items()
                                                               if k != "stapo_token_stats"}))
    ref_losses = _losses(vanilla)
    assert len(ref_losses) == 3 and ref_losses.abs().max() > 1e-3  # a real, non-trivial run
    for s2t in ({"s2t_enabled": False}, {"s2t_prob_threshold": 0.0}):
        trainer, w = _train(STAPOTrainer, _config(**common, **s2t))
        _assert_rel_close(_losses(trainer), ref_losses)
        for name, ref in w_ref.state_dict().items():
            _assert_rel_close(w.state_dict()[name].double(), ref.double())
    # and S2T with a biting τ_p does change the update (so the comparison above can fail)
    _, w_on = _train(STAPOTrainer, _config(**common, s2t_prob_threshold=HIGH_PROB_THRESHOLD))
    diff = max(float((w_on.state_dict()[k] - v).abs().max()) for k, v in w_ref.state_dict().items())
    assert diff > 1e-5


# --- per-token statistics: stapo.ops.model_token_stats versus TRL's fused head ----------------------


def _scoring_batch(vocab: int):
    """4 rows: prompts of 5, 3, 6, 2 tokens left-padded to 6, completions of 4, 2, 1, 4 right-padded to 4."""
    g = torch.Generator().manual_seed(0)
    prompt_lens, completion_lens, P, K = (5, 3, 6, 2), (4, 2, 1, 4), 6, 4
    ids = torch.randint(3, vocab, (4, P + K), generator=g)
    mask = torch.zeros(4, P + K, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        mask[i, P - p : P + c] = 1
    return ids.masked_fill(mask == 0, 0), mask, K


def test_stapo_token_stats_match_trl_forward():
    from stapo.ops import model_token_stats

    model, tok = tiny_model_and_tok()
    trainer = STAPOTrainer(model=model, reward_funcs=digit_fraction, args=_config(temperature=0.7),
                           train_dataset=prompts(), processing_class=tok)
    assert trainer.token_stats_blocker is None  # the default path on a plain causal LM, one process
    ids, mask, K = _scoring_batch(len(tok))
    pad = mask[:, -K:] == 0

    def scored(fn):
        model.zero_grad()
        logps, entropy, aux = fn(trainer, trainer.model, ids, mask, K, batch_size=3, compute_entropy=True)
        (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()
        return logps.detach(), entropy.detach(), aux, {n: p.grad.clone() for n, p in model.named_parameters()}

    lp, ent, aux, grads = scored(STAPOTrainer._get_per_token_logps_and_entropies)
    ref_lp, ref_ent, _, ref_grads = scored(GRPOTrainer._get_per_token_logps_and_entropies)
    # it is stapo's op (at the trainer's temperature, in TRL's row chunks of 3), not TRL's forward
    ours = torch.cat([model_token_stats(model, i, m, ids.shape[1] - K, temperature=0.7).logprobs
                      for i, m in zip(ids.split(3), mask.split(3))])
    assert torch.equal(lp, ours.masked_fill(pad, 0.0)) and aux is None
    # TRL's contract: zero where the attention mask is 0, and the same numbers to rounding (position ids
    # differ: generate's numbering here, arange in TRL's forward; RoPE cancels the shift up to rounding)
    assert torch.all(lp[pad] == 0) and torch.all(ent[pad] == 0) and torch.all(lp[~pad] < 0)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        _assert_rel_close(grads[name].double(), g.double(), rel=1e-5)
    # entropy only on request, as TRL
    assert trainer._get_per_token_logps_and_entropies(model, ids, mask, K)[1] is None


def test_token_stats_fall_back_to_trl_where_the_op_does_not_apply():
    model, tok = tiny_model_and_tok()

    def blocker(**overrides):
        return STAPOTrainer(model=model, reward_funcs=digit_fraction, args=_config(**overrides),
                            train_dataset=prompts(), processing_class=tok).token_stats_blocker

    assert blocker(stapo_token_stats=False) == "stapo_token_stats=False"
    # the op detaches the entropy; TRL's forward gives the bonus its gradient (checked in
    # test_every_loss_type_gives_silenced_tokens_zero_gradient[dapo-extra1])
    assert "entropy's gradient" in blocker(entropy_coef=0.01)


# --- silencing ------------------------------------------------------------------------------------


def _one_step(loss_type="dapo", **overrides):
    config = _config(max_steps=1, loss_type=loss_type, s2t_prob_threshold=HIGH_PROB_THRESHOLD, **overrides)
    trainer, _ = _train(RecordingTrainer, config)
    assert len(trainer.plans) == 1 and len(trainer.loss_calls) == 1
    _, plan, (stats,) = trainer.plans[0]
    _, loss, inputs, logps, entropy = trainer.loss_calls[0]
    return trainer, plan, stats, loss, inputs, logps, entropy


def test_silenced_tokens_get_zero_gradient_and_loss_is_stapo_policy_loss():
    trainer, plan, stats, loss, inputs, logps, entropy = _one_step("dapo")
    p, q = HIGH_PROB_THRESHOLD, trainer.args.s2t_entropy_quantile
    adv, mask = stats.advantages, stats.response_mask  # [B], [B, T]
    # the S2T pass scores exactly the numbers the loss sees (same TRL fused head, same batch)
    assert torch.equal(stats.logprobs, logps.detach()) and torch.equal(stats.entropy, entropy.detach())
    silenced = plan.silenced[0]
    assert torch.equal(silenced, s2t_mask(logps, entropy, adv, mask, p, q))  # one micro-batch = the step
    candidates = s2t_candidates(logps, adv, mask, p)
    assert silenced.any() and (candidates & ~silenced).any()  # S2T bites, and only below the quantile
    assert plan.threshold == quantile(entropy.detach()[candidates], q)

    # exactly zero gradient on silenced tokens; kept tokens with A ≠ 0 all get one
    grad = logps.grad
    assert torch.all(grad[silenced] == 0)
    kept_moving = mask & ~silenced & (adv.unsqueeze(1) != 0)
    assert torch.all(grad[kept_moving] != 0)

    # loss and gradient = stapo.policy_loss("stapo") on the same tensors (paper defaults: clip 0.2/0.28,
    # dual clip 10 = TRL's delta, token mean over kept tokens)
    leaf = logps.detach().clone().requires_grad_(True)
    expected, metrics = policy_loss("stapo", leaf, leaf.detach(), adv, mask, entropy=entropy.detach(),
                                    prob_threshold=p, entropy_quantile=q)
    expected.backward()
    _assert_rel_close(loss.double(), expected.detach().double())
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-6, atol=1e-9)
    # TRL issue 6369: the denominator is the kept-token count, not the valid-token count
    kept = int((mask & ~silenced).sum())
    assert float(inputs["num_items_in_batch"]) == kept < int(mask.sum())
    assert float(metrics["s2t/silenced"]) == float(silenced.sum()) == plan.silenced_count


@pytest.mark.parametrize(
    "loss_type,extra",
    [(t, {}) for t in TRL_LOSS_TYPES if t != "dapo"]
    + [("grpo", {"importance_sampling_level": "sequence"}), ("dapo", {"entropy_coef": 0.01})],
)
def test_every_loss_type_gives_silenced_tokens_zero_gradient(loss_type, extra):
    _, plan, stats, loss, _, logps, entropy = _one_step(loss_type, **extra)
    silenced, mask = plan.silenced[0], stats.response_mask
    assert silenced.any() and torch.isfinite(loss)
    assert torch.all(logps.grad[silenced] == 0)
    assert (logps.grad[mask & ~silenced] != 0).any()
    if entropy.grad is not None:  # the entropy bonus acts on the same kept tokens
        assert torch.all(entropy.grad[silenced] == 0) and (entropy.grad[mask & ~silenced] != 0).any()
    if loss_type == "bnpo":  # local token mean over kept tokens = the stapo loss on one micro-batch
        expected, _ = policy_loss("stapo", logps.detach(), logps.detach(), stats.advantages, mask,
                                  entropy=entropy.detach(), prob_threshold=HIGH_PROB_THRESHOLD)
        _assert_rel_close(loss.double(), expected.double())


def test_second_iteration_off_policy_loss_is_stapo_policy_loss():
    # num_iterations=2 reuses the generation after one update: the S2T pass rescores it with the new
    # weights, and ratios ≠ 1 exercise the clips (TRL's delta=10 is verl's dual clip c=10)
    config = _config(max_steps=2, num_iterations=2, learning_rate=0.05, s2t_prob_threshold=HIGH_PROB_THRESHOLD)
    trainer, _ = _train(RecordingTrainer, config)
    assert [step for step, _, _ in trainer.plans] == [0, 1]  # the second pass replans on the same buffer
    (_, _, (s0,)), (_, plan, (stats,)) = trainer.plans
    assert torch.equal(s0.response_mask, stats.response_mask) and not torch.equal(s0.logprobs, stats.logprobs)
    _, loss, inputs, logps, entropy = trainer.loss_calls[1]
    old = inputs["old_per_token_logps"]
    ratio = (logps.detach() - old).exp()[stats.response_mask]
    assert float((ratio - 1).abs().max()) > 0.28  # some token is past a clip
    leaf = logps.detach().clone().requires_grad_(True)
    expected, _ = policy_loss("stapo", leaf, old, stats.advantages, stats.response_mask, entropy=entropy.detach(),
                              prob_threshold=HIGH_PROB_THRESHOLD, entropy_threshold=plan.threshold)
    expected.backward()
    _assert_rel_close(loss.double(), expected.detach().double())
    torch.testing.assert_close(logps.grad, leaf.grad, rtol=1e-5, atol=1e-8)
    assert torch.all(logps.grad[plan.silenced[0]] == 0)


# --- scope of the threshold -------------------------------------------------------------------------


def test_threshold_spans_all_accumulation_micro_batches_of_the_step():
    config = _config(max_steps=2, gradient_accumulation_steps=2, s2t_prob_threshold=HIGH_PROB_THRESHOLD)
    trainer, _ = _train(RecordingTrainer, config)
    assert [step for step, _, _ in trainer.plans] == [0, 2]  # one plan per optimizer step, at its start
    p, q = HIGH_PROB_THRESHOLD, config.s2t_entropy_quantile
    for step, plan, stats in trainer.plans:
        assert len(stats) == 2 == len(plan.silenced)
        cands = [s.entropy.double()[s2t_candidates(s.logprobs, s.advantages, s.response_mask, p)] for s in stats]
        assert plan.threshold == quantile(torch.cat(cands), q)  # over both micro-batches, not each
        masks = [s2t_mask(s.logprobs, s.entropy, s.advantages, s.response_mask, p, q, plan.threshold)
                 for s in stats]
        assert all(torch.equal(a, b) for a, b in zip(masks, plan.silenced))
        kept = sum(int((s.response_mask & ~m).sum()) for s, m in zip(stats, plan.silenced))
        assert float(plan.num_items_in_batch) == kept  # spg == GA: exactly the step's kept tokens

    # the step's loss is the stapo token mean over the step's kept tokens (global denominator)
    for step, plan, stats in trainer.plans:
        calls = [c for c in trainer.loss_calls if step <= c[0] < step + 2]
        total = sum(float(c[1]) for c in calls)
        expected = sum(
            float(policy_loss("stapo", lp.detach(), lp.detach(), s.advantages, s.response_mask,
                              entropy=ent.detach(), prob_threshold=p, entropy_threshold=plan.threshold,
                              denominator=float(plan.num_items_in_batch))[0])
            for (_, _, _, lp, ent), s in zip(calls, stats)
        )
        assert abs(total - expected) <= 1e-6 * max(abs(expected), 1e-3)


def test_segment_scope_when_a_step_spans_two_generations():
    config = _config(max_steps=1, gradient_accumulation_steps=2, steps_per_generation=1,
                     s2t_prob_threshold=HIGH_PROB_THRESHOLD)
    model, tok = tiny_model_and_tok()
    with pytest.warns(UserWarning, match="not over the whole step"):
        trainer = RecordingTrainer(model=model, reward_funcs=digit_fraction, args=config,
                                   train_dataset=prompts(), processing_class=tok)
    trainer.train()
    assert [step for step, _, _ in trainer.plans] == [0, 1]  # one plan per generation batch
    for (step, plan, (stats,)), (_, loss, _, lp, ent) in zip(trainer.plans, trainer.loss_calls):
        # each segment is a kept-token mean weighted by its share (1 of 2 micro-batches) of the step
        kept = float((stats.response_mask & ~plan.silenced[0]).sum())
        assert float(plan.num_items_in_batch) == kept  # K · spg / n = K · 1 / 1
        expected, _ = policy_loss("stapo", lp.detach(), lp.detach(), stats.advantages, stats.response_mask,
                                  entropy=ent.detach(), prob_threshold=HIGH_PROB_THRESHOLD,
                                  entropy_threshold=plan.threshold, denominator=2 * kept)
        _assert_rel_close(loss.double(), expected.double())


def test_segment_length_and_scope():
    # GA = 4, one generation every 8 micro-steps: whole steps
    assert [segment_length(s, 0, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert segment_length(4, 4, 4, 8) == 4
    # GA = 4, a generation every 2: each step splits in two segments of 2
    assert segment_length(0, 0, 4, 2) == 2 and segment_length(2, 0, 4, 2) == 2
    # GA = 4, generation every 6: the step [4, 8) splits at 6
    assert segment_length(4, 4, 4, 6) == 2 and segment_length(6, 4, 4, 6) == 2
    assert threshold_scope(4, 4, 1) == "optimizer step" and threshold_scope(2, 1, 2) == "optimizer step"
    assert threshold_scope(4, 2, 1) == "segment" and threshold_scope(4, 6, 1) == "segment"
    with pytest.raises(RuntimeError, match="outside the optimizer step"):
        segment_length(5, 0, 4, 8)


# --- configuration, compatibility, version -----------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = _config()
    assert (cfg.s2t_enabled, cfg.s2t_prob_threshold, cfg.s2t_entropy_quantile) == (True, 0.002, 0.75)
    plain = STAPOConfig(output_dir=_config().output_dir, use_cpu=True, bf16=False)
    assert (plain.epsilon_high, plain.delta, plain.disable_dropout, plain.loss_type) == (0.28, 10.0, True, "dapo")
    for name, bad in (("s2t_prob_threshold", 1.5), ("s2t_entropy_quantile", -0.1), ("s2t_entropy_quantile", float("nan"))):
        with pytest.raises(ValueError, match=name):
            _config(**{name: bad})


def test_s2t_disabled_has_grpo_config_defaults():
    """STAPOConfig(s2t_enabled=False) equals GRPOConfig option for option (issue 24: three defaults differed)."""
    where = {"output_dir": _config().output_dir, "use_cpu": True, "bf16": False}
    off, grpo, again = STAPOConfig(s2t_enabled=False, **where), GRPOConfig(**where), GRPOConfig(**where)
    fields = [f.name for f in dataclasses.fields(GRPOConfig) if getattr(grpo, f.name) == getattr(again, f.name)]
    assert len(fields) > 100 and {"epsilon_high", "delta", "disable_dropout"} <= set(fields)
    assert {name: getattr(off, name) for name in fields} == {name: getattr(grpo, name) for name in fields}
    assert off.stapo_token_stats is False  # TRL's own forward: GRPOTrainer's numbers, not stapo's to rounding


def test_s2t_disabled_trains_like_grpo_trainer_with_its_defaults():
    """The same options, TRL's defaults for the rest: STAPOTrainer(s2t_enabled=False) logs GRPOTrainer's losses.
    num_iterations=2 moves the policy between passes, so the clip defaults matter (they did not match before)."""
    common = {k: v for k, v in BASE.items() if k not in ("epsilon_high", "delta", "disable_dropout")}
    common.update(max_steps=4, num_iterations=2, learning_rate=0.05)
    out = os.path.join(tempfile.gettempdir(), "stapo-trl-tests")
    grpo, _ = _train(GRPOTrainer, GRPOConfig(output_dir=out, **common))
    off, _ = _train(STAPOTrainer, STAPOConfig(output_dir=out, s2t_enabled=False, **common))
    assert len(_losses(grpo)) == 4
    _assert_rel_close(_losses(off), _losses(grpo))
    paper, _ = _train(STAPOTrainer, STAPOConfig(output_dir=out, s2t_enabled=False, epsilon_high=0.28, delta=10.0,
                                               **common))
    assert float((_losses(paper) - _losses(grpo)).abs().max()) > 1e-4  # the old defaults: another loss


def test_trainer_rejects_grpo_config_and_mask_free_options():
    model, tok = tiny_model_and_tok()
    with pytest.raises(TypeError, match="STAPOConfig"):
        STAPOTrainer(model=model, reward_funcs=digit_fraction, args=_config(GRPOConfig), train_dataset=prompts(),
                     processing_class=tok)
    liger = _config(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    with pytest.raises(ValueError, match=r"S2T \(s2t_enabled=True\) cannot be combined.*fused_linear_cross_entropy"):
        STAPOTrainer(model=model, reward_funcs=digit_fraction, args=liger, train_dataset=prompts(),
                     processing_class=tok)


def test_version_outside_tested_range_warns_with_the_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_trl_version() is True  # the installed TRL is the tested one
        assert check_trl_version("1.16.3") is True
    for version in ("1.15.0", "1.17.0", "2.0.0"):
        with pytest.warns(UserWarning, match=rf"tested with trl>=1\.16,<1\.17 .* but trl {version}"):
            assert check_trl_version(version) is False
    assert stapo_trl.TESTED_TRL == ">=1.16,<1.17"


def test_tested_range_matches_the_trl_extra():
    import pathlib

    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["trl"] == [f"trl{stapo_trl.TESTED_TRL}"]


# --- PEFT and evaluation ------------------------------------------------------------------------------


def test_peft_lora_with_s2t_trains_the_adapter_only():
    from peft import LoraConfig

    model, tok = tiny_model_and_tok()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config(max_steps=1, s2t_prob_threshold=HIGH_PROB_THRESHOLD)
    trainer = RecordingTrainer(model=model, reward_funcs=digit_fraction, args=config, train_dataset=prompts(),
                               processing_class=tok,
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    _, plan, _ = trainer.plans[0]
    assert plan.silenced[0].any()
    assert torch.all(trainer.loss_calls[0][3].grad[plan.silenced[0]] == 0)
    named = dict(trainer.model.named_parameters())
    lora_b = [p for n, p in named.items() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().max()) > 0 for p in lora_b)  # lora_B starts at 0, so it trained
    frozen = trainer.model.get_base_model().state_dict()
    assert torch.equal(frozen["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_evaluation_logs_s2t_metrics():
    model, tok = tiny_model_and_tok()
    config = _config(s2t_prob_threshold=HIGH_PROB_THRESHOLD, per_device_eval_batch_size=4)
    trainer = STAPOTrainer(model=model, reward_funcs=digit_fraction, args=config, train_dataset=prompts(),
                           eval_dataset=prompts(4), processing_class=tok)
    out = trainer.evaluate()
    assert out["eval_s2t/candidates"] > 0 and 0 < out["eval_s2t/masked_fraction"] < 1
    assert out["eval_s2t/entropy_threshold"] > 0


def test_train_metrics_are_logged_through_trl():
    config = _config(max_steps=2, s2t_prob_threshold=HIGH_PROB_THRESHOLD)
    trainer, _ = _train(RecordingTrainer, config)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for log, (_, plan, _) in zip(logs, trainer.plans):
        assert log["s2t/entropy_threshold"] == pytest.approx(plan.threshold, rel=1e-12)
        assert log["s2t/candidates"] == plan.candidates
        assert log["s2t/masked_fraction"] == pytest.approx(plan.silenced_count / plan.valid, rel=1e-12)
