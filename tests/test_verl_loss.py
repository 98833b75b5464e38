"""stapo's objectives inside verl's own loss path (`make test-verl`, verl in .venv-verl).

Skipped where verl is not installed (the main environment), unless STAPO_REQUIRE_VERL=1, which
`make test-verl` sets so a broken verl environment fails instead of skipping.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if os.environ.get("STAPO_REQUIRE_VERL") == "1":
    import verl  # fail loudly: the test target promised a working verl
else:
    verl = pytest.importorskip("verl")

from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.workers.utils.losses import ppo_loss

import stapo
from helpers.planner_cases import TAU_P, micro_batches, micro_view
from helpers.verl_engine import (
    CPUEngine,
    actor_config,
    dp_model_and_data,
    padded_stats,
    sequence_stats,
    train_data,
)
from stapo.integrations import verl as sv
from stapo.models.tiny import tiny_qwen3
from stapo.objectives import TokenStats, build_objective, count_units, loss_token_mask

pytestmark = pytest.mark.verl
VOCAB = 48
N = 8


@pytest.fixture(scope="module")
def setup():
    model, data = dp_model_and_data(N, VOCAB)
    with torch.no_grad():
        lp, _ = padded_stats(model, data)
    positive = lp[data["response_mask"].bool() & (data["advantages"] > 0)]
    tau_p = float(positive.median().exp())  # a random tiny model: half the positive tokens are candidates
    return model, data, tau_p


def config_for(name: str, tau_p: float, *extra: str):
    return actor_config(f"actor_rollout_ref.actor.policy_loss.loss_mode={name}",
                        f"actor_rollout_ref.actor.policy_loss.tau_p={tau_p!r}",
                        "actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.clip_ratio_c=10.0",
                        *extra)


def reference(model, data, name, opts):
    """stapo.policy_loss on the whole mini-batch at once: (loss, metrics, {param: grad})."""
    model.zero_grad()
    lp, ent = padded_stats(model, data)
    loss, metrics = stapo.policy_loss(name, lp, data["old_log_probs"], data["advantages"],
                                      data["response_mask"].bool(), entropy=ent, **opts)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), metrics, grads


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- verl's own ppo_loss with the plugin == stapo.policy_loss --------------------------------------

def verl_loss(model, data, name, config, **extra):
    """``ppo_loss_with_entropy`` on verl-shaped float64 leaves: (loss, metrics, d loss / d log-prob values,
    padded lp, entropy, mask, the mini-batch's statistics, data). ``extra``: more [B, T] fields of ``data``."""
    data = data.copy()
    data["old_log_probs"] = data["old_log_probs"].double()
    data["advantages"] = data["advantages"].double()
    for key, value in extra.items():
        data[key] = value
    with torch.no_grad():
        out = sequence_stats(model, data)
    values = out["log_probs"].values().double().requires_grad_(True)  # [total_nnz] leaf
    offsets = data["input_ids"].offsets()
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(values, offsets),
                    "entropy": torch.nested.nested_tensor_from_jagged(out["entropy"].values().double(), offsets)}
    padded = sv.no_padding_2_padding  # verl's own
    lp, ent = padded(model_output["log_probs"], data), padded(model_output["entropy"], data)
    mask = data["response_mask"].bool()
    stats = sv.minibatch_statistics(name, sv.objective_options(name, config), lp.detach(), ent, data["advantages"],
                                    mask)
    for key, value in {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": N}.items():
        tu.assign_non_tensor(data, **{key: value})
    with sv.minibatch_scope(stats):
        loss, metrics = sv.ppo_loss_with_entropy(config, model_output, data)
    (grad,) = torch.autograd.grad(loss, values)
    return loss, metrics, grad, lp, ent, mask, stats, data


@pytest.mark.parametrize("name", ["stapo", "entropy20"])
def test_ppo_loss_equals_stapo_policy_loss(setup, name):
    """verl's ppo_loss on verl-shaped TensorDicts, float64 leaves: same loss and d loss / d log-prob."""
    model, data, tau_p = setup
    config = config_for(name, tau_p)
    opts = sv.objective_options(name, config)
    loss, metrics, grad, lp, ent, mask, stats, data = verl_loss(model, data, name, config)

    leaf = lp.detach().clone().requires_grad_(True)
    ref, ref_metrics = stapo.policy_loss(name, leaf, data["old_log_probs"], data["advantages"], mask, entropy=ent,
                                         **opts)
    (ref_grad_padded,) = torch.autograd.grad(ref, leaf)
    ref_grad = padded_to_values(ref_grad_padded, data)  # d loss / d log-prob is zero off the responses
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    # the trainer's path (TrainingObjective.plan, then .loss per micro-batch) on the same tensors, in halves
    objective = build_objective(name, opts)
    halves = [slice(0, N // 2), slice(N // 2, N)]
    micros = [TokenStats(lp.detach()[h], ent[h], data["advantages"][h], mask[h]) for h in halves]
    plan = objective.plan(micros)
    assert plan.overrides == stats.overrides and plan.denominator == stats.denominator
    trainer_loss = sum(objective.loss(plan, i, leaf[h], data["old_log_probs"][h], micro_view(m), entropy=ent[h],
                                      denominator=plan.denominator)[0] for i, (h, m) in enumerate(zip(halves, micros)))
    torch.testing.assert_close(trainer_loss, loss.detach(), rtol=0, atol=1e-12)
    if name == "stapo":
        silenced = stapo.s2t_mask(lp.detach(), ent, data["advantages"], mask, tau_p, 0.75)
        assert 0 < int(silenced.sum()) < int(mask.sum())  # the mask does something here
        assert torch.all(ref_grad_padded[silenced] == 0)  # exactly zero at silenced tokens
    assert float(ref_metrics["loss/policy"]) == pytest.approx(float(loss.detach()), abs=1e-12)
    # stapo's metrics have names of their own beside verl's (verl logs its own actor/entropy)
    assert metrics["stapo/policy"].values[0] == pytest.approx(float(loss.detach()), abs=1e-12)
    assert "stapo/entropy" in metrics and "actor/entropy" not in metrics


def test_kl_loss_and_entropy_bonus_respect_the_mask(setup):
    """use_kl_loss and entropy_coeff act on the kept tokens only, normalised over them, as stapo's own KL:
    a silenced token gets no gradient from either term."""
    model, data, tau_p = setup
    config = config_for("stapo", tau_p, "actor_rollout_ref.actor.use_kl_loss=True",
                        "actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.actor.kl_loss_coef=0.1",
                        "actor_rollout_ref.actor.entropy_coeff=0.01")
    opts = sv.objective_options("stapo", config)
    g = torch.Generator().manual_seed(5)
    ref_lp = data["old_log_probs"].double() + 0.3 * torch.randn(data["old_log_probs"].shape, generator=g,
                                                                dtype=torch.float64)
    loss, metrics, grad, lp, ent, mask, stats, data = verl_loss(model, data, "stapo", config, ref_log_prob=ref_lp)
    leaf = lp.detach().clone().requires_grad_(True)
    ref, _ = stapo.policy_loss("stapo", leaf, data["old_log_probs"], data["advantages"], mask, entropy=ent,
                               ref_logprobs=ref_lp, **{**opts, "kl_coef": 0.1})  # k3 = verl's low_var_kl
    keep = mask & ~stapo.s2t_mask(lp.detach(), ent, data["advantages"], mask, tau_p, 0.75,
                                  stats.overrides["entropy_threshold"])
    assert 0 < int(keep.sum()) < int(mask.sum())
    entropy_bonus = (ent * keep).sum() / keep.sum()  # over the kept tokens
    torch.testing.assert_close(loss, ref - 0.01 * entropy_bonus, rtol=0, atol=1e-10)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    torch.testing.assert_close(grad, padded_to_values(ref_grad, data), rtol=0, atol=1e-10)
    assert torch.all(padded_to_values(torch.where(keep, 0.0, 1.0).double(), data)[grad != 0] == 0)
    assert float(metrics["kl_loss"].values[0]) > 0


def test_clip_ratio_c_at_most_one_is_refused(setup):
    """verl's dual-clip loss asserts c > 1; loss_mode=stapo refuses it too, naming verl's key."""
    _, _, tau_p = setup
    for c in ("1.0", "0.5"):
        config = config_for("stapo", tau_p, f"actor_rollout_ref.actor.clip_ratio_c={c}")
        with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.clip_ratio_c must be > 1; got"):
            sv.objective_options("stapo", config)
        with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.clip_ratio_c must be > 1"):
            validate(trainer_config(f"actor_rollout_ref.actor.clip_ratio_c={c}"))


def trainer_config(*overrides: str):
    """verl's whole trainer config (what main_ppo validates) from stapo_trainer.yaml + ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=sv.CONFIG_DIR, version_base=None):
        return compose("stapo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                                                   *overrides])


def validate(config):
    """verl's validate_config, looked up as main_ppo does (``from verl.utils.config import validate_config``)."""
    from verl.utils.config import validate_config

    validate_config(config=config, use_reference_policy=False, use_critic=False)


def test_bypass_mode_is_refused():
    """algorithm.rollout_correction.bypass_mode=True would swap in verl's own loss: refused before training."""
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    config = trainer_config("algorithm.rollout_correction.bypass_mode=True")
    with pytest.raises(ValueError, match="bypass_mode=True replaces loss_mode='stapo'"):
        validate(config)
    with pytest.raises(ValueError, match="bypass_mode=True replaces loss_mode='stapo'"):
        apply_bypass_mode(batch=None, rollout_corr_config=config.algorithm.rollout_correction,
                          policy_loss_config=config.actor_rollout_ref.actor.policy_loss)
    from pathlib import Path

    documented = _main_ppo_overrides((Path(__file__).resolve().parents[1] / "docs/verl.md").read_text())
    validate(trainer_config(*documented))  # the documented command passes


@pytest.mark.parametrize("name", sv.LOSS_MODES)
def test_minibatch_statistics_is_the_trainers_plan(name):
    """tests/test_planner.py's tensors: verl's hook plans exactly as stapo's trainer (and TRL) do."""
    stats = micro_batches()
    opts = {"prob_threshold": TAU_P} if name == "stapo" else {}
    objective = build_objective(name, opts)
    plan = objective.plan(stats)
    cat = [torch.cat(parts) for parts in zip(*[(s.logprobs, s.entropy, s.advantages, s.response_mask) for s in stats])]
    hook = sv.minibatch_statistics(name, {**opts, "loss_agg_mode": "token-mean"}, *cat)
    assert hook.overrides == plan.overrides and hook.denominator == plan.denominator
    assert 0 < plan.denominator < sum(int(s.response_mask.sum()) for s in stats)  # the keep mask bites


def padded_to_values(padded: torch.Tensor, data) -> torch.Tensor:
    """Inverse of verl's no_padding_2_padding for the response positions: [B, T] -> [total_nnz]."""
    offsets = data["input_ids"].offsets()
    response_lens = data["response_mask"].sum(-1).long()
    out = torch.zeros(int(offsets[-1]), dtype=padded.dtype)
    for i, (end, n) in enumerate(zip(offsets[1:].tolist(), response_lens.tolist())):
        out[end - n - 1: end - 1] = padded[i, :n]
    return out


# --- the BaseEngine.train_batch hook: pre-pass, mini-batch-wide τ_h, kept-token normaliser ------------

@pytest.mark.parametrize("name", ["stapo", "entropy20"])
@pytest.mark.parametrize("split", [{"micro_batch_size": 1}, {"micro_batch_size": 4}, {"micro_batch_size": 8},
                                   {"max_token_len": 24}])
def test_engine_train_batch_matches_stapo(setup, name, split):
    """verl's BaseEngine.train_batch + verl's ppo_loss, any micro-batch split: stapo's whole-batch gradient."""
    model, data, tau_p = setup
    config = config_for(name, tau_p)
    _, ref_metrics, ref_grads = reference(model, data, name, sv.objective_options(name, config))
    engine = CPUEngine(model)
    batch = train_data(data, **split)
    out = engine.train_batch(batch, functools.partial(ppo_loss, config=config))
    assert engine.prepass_calls == 1
    assert tu.get_non_tensor_data(batch, "calculate_entropy", False) is True
    assert max_diff(engine.grads, ref_grads) < 1e-6
    assert sum(out["loss"]) == pytest.approx(float(ref_metrics["loss/policy"]), abs=1e-6)


def test_later_mini_batches_use_the_updated_policy(setup):
    """Two mini-batches with an SGD step between them: the second pre-pass scores the updated weights,
    so the result equals stapo's loss on each mini-batch in turn (a step-wide τ_h from the rollout
    policy would not)."""
    import copy

    model, data, tau_p = setup
    config = config_for("stapo", tau_p)
    opts = sv.objective_options("stapo", config)
    halves = [tu.index_select_tensor_dict(data, list(range(i, i + N // 2))) for i in (0, N // 2)]
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    engine = CPUEngine(ours, lr=0.5)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.5)
    for half in halves:
        engine.train_batch(train_data(half, micro_batch_size=2), functools.partial(ppo_loss, config=config))
        _, _, grads = reference(ref, half, "stapo", opts)
        for name, p in ref.named_parameters():
            p.grad = grads[name]
        sgd.step()
    assert engine.prepass_calls == 2
    moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), model.parameters()))
    assert moved > 1e-3  # the first step changed the policy the second pre-pass scores
    assert max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters())) < 1e-6


def test_engine_threshold_is_not_micro_batch_scoped(setup):
    """The test above can fail: τ_h per micro-batch (no pre-pass) gives a different gradient here."""
    model, data, tau_p = setup
    config = config_for("stapo", tau_p)
    opts = sv.objective_options("stapo", config)
    _, _, ref_grads = reference(model, data, "stapo", opts)
    model.zero_grad()
    lp, ent = padded_stats(model, data)
    mask, adv = data["response_mask"].bool(), data["advantages"]
    total = count_units(loss_token_mask("stapo", lp, ent, adv, mask, **opts), "token-mean")
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):  # own τ_h, global denominator
        loss, _ = stapo.policy_loss("stapo", lp[rows], data["old_log_probs"][rows], adv[rows], mask[rows],
                                    entropy=ent[rows], denominator=total, **opts)
        loss.backward(retain_graph=True)
    micro_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    model.zero_grad()
    assert max_diff(micro_grads, ref_grads) > 1e-4


def test_other_loss_modes_pass_through(setup):
    """loss_mode=vanilla: no pre-pass, verl's loss unchanged."""
    model, data, _ = setup
    config = actor_config("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla")
    engine = CPUEngine(model)
    batch = train_data(data, micro_batch_size=4)
    engine.train_batch(batch, functools.partial(ppo_loss, config=config))
    assert engine.prepass_calls == 0
    assert tu.get_non_tensor_data(batch, "calculate_entropy", None) is False


# --- loud failures ---------------------------------------------------------------------------------

def _loss_inputs(data, config, entropy=True):
    out = sequence_stats_no_grad(data, entropy)
    for key, value in {"dp_size": 1, "batch_num_tokens": int(data["response_mask"].sum()),
                       "global_batch_size": N}.items():
        tu.assign_non_tensor(data, **{key: value})
    return config, out, data


def sequence_stats_no_grad(data, entropy):
    model = tiny_qwen3(VOCAB, hidden_size=64, num_layers=1, num_heads=2, head_dim=32, seed=0)
    with torch.no_grad():
        return sequence_stats(model, data, entropy=entropy)


@pytest.mark.parametrize("name", sv.LOSS_MODES)
def test_verl_ppo_loss_without_hook_raises(setup, name):
    """verl's plain ppo_loss (no pass-through) with loss_mode=stapo refuses to train without the mask."""
    _, data, tau_p = setup
    config, out, batch = _loss_inputs(data.copy(), config_for(name, tau_p))
    with pytest.raises(RuntimeError, match="without stapo's entropy pass-through"):
        ppo_loss(config, out, batch)
    with pytest.raises(RuntimeError, match="without stapo's entropy pass-through"):
        sv.ppo_loss_with_entropy(config, out, batch)  # outside the train_batch hook: no τ_h
    lp = sv.no_padding_2_padding(out["log_probs"], batch)
    with pytest.raises(RuntimeError, match="without stapo's entropy pass-through"):
        core_algos.get_policy_loss_fn(name)(old_log_prob=lp, log_prob=lp, advantages=batch["advantages"],
                                            response_mask=batch["response_mask"].bool(), loss_agg_mode="token-mean",
                                            config=config, rollout_is_weights=None)


def test_missing_entropy_and_is_weights_raise(setup):
    _, data, tau_p = setup
    config, out, batch = _loss_inputs(data.copy(), config_for("stapo", tau_p), entropy=False)
    scope = sv.MiniBatch({"entropy_threshold": 1.0}, 10.0)
    with sv.minibatch_scope(scope), pytest.raises(RuntimeError, match="no entropy"):
        sv.ppo_loss_with_entropy(config, out, batch)
    config, out, batch = _loss_inputs(data.copy(), config_for("stapo", tau_p))
    batch["rollout_is_weights"] = torch.ones_like(batch["advantages"])
    with sv.minibatch_scope(scope), pytest.raises(NotImplementedError, match="rollout_correction"):
        sv.ppo_loss_with_entropy(config, out, batch)


def test_unsupported_aggregation_is_named(setup):
    _, _, tau_p = setup
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.loss_agg_mode='token-sum'"):
        sv.objective_options("stapo", config_for("stapo", tau_p, "actor_rollout_ref.actor.loss_agg_mode=token-sum"))


def test_unsupported_verl_version_raises():
    assert sv.check_verl_version() == verl.__version__
    for version in ("0.8.0", "0.9.0", "0.10.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"verl {version} is installed"):
            sv.check_verl_version(version)


# --- command-line hyperparameters -----------------------------------------------------------------

def test_command_line_options_reach_the_loss():
    config = actor_config("actor_rollout_ref.actor.policy_loss.tau_p=0.01",
                          "actor_rollout_ref.actor.policy_loss.entropy_quantile=0.5",
                          "actor_rollout_ref.actor.clip_ratio_low=0.1", "actor_rollout_ref.actor.clip_ratio_high=0.3",
                          "actor_rollout_ref.actor.clip_ratio_c=10.0")
    assert isinstance(config.policy_loss, sv.STAPOPolicyLossConfig)
    opts = sv.objective_options("stapo", config)
    assert opts == {"clip_low": 0.1, "clip_high": 0.3, "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean",
                    "norm_length": None, "kl_coef": 0.0, "prob_threshold": 0.01, "entropy_quantile": 0.5}
    config = actor_config("actor_rollout_ref.actor.policy_loss.loss_mode=entropy20",
                          "actor_rollout_ref.actor.policy_loss.top_ratio=0.1")
    assert sv.objective_options("entropy20", config)["top_ratio"] == 0.1


@pytest.mark.parametrize("override, field", [("tau_p=1.5", "tau_p"), ("entropy_quantile=nan", "entropy_quantile"),
                                             ("normalize_by=some", "normalize_by")])
def test_bad_command_line_option_is_named(override, field):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=f"actor_rollout_ref.actor.policy_loss.{field}"):
        actor_config(f"actor_rollout_ref.actor.policy_loss.{override}")


def test_plain_policy_loss_config_rejects_stapo_options():
    """The fact behind STAPOPolicyLossConfig: verl's own PolicyLossConfig takes no `tau_p`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                                                "+actor_rollout_ref.actor.policy_loss.tau_p=0.01"])
    with pytest.raises(InstantiationException, match="tau_p"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


# --- the documented command lines compose into the intended actor config ---------------------------

def _main_ppo_overrides(text: str) -> list[str]:
    """The hydra overrides of the first `python -m verl.trainer.main_ppo` command in ``text``."""
    import re
    import shlex

    start = re.search(r"-m verl\.trainer\.main_ppo[\s\\]+--config-path", text).start()
    command = re.split(r"(?<!\\)\n", text[start:])[0].replace("\\\n", " ")
    words = [w for w in shlex.split(command, posix=True)[1:] if not w.startswith("--config-") and w != "2>&1"]
    return [re.sub(r"\$\{?\w+\}?", "1", w) for w in words if "=" in w]


@pytest.mark.parametrize("path", ["docs/verl.md", "scripts/verl_gpu_check.sh"])
def test_documented_command_composes(path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / path).read_text()
    overrides = [o for o in _main_ppo_overrides(text) if not o.startswith("actor_rollout_ref.actor.ppo_micro")]
    assert any(o == "actor_rollout_ref.actor.policy_loss.loss_mode=stapo" for o in overrides)
    config = actor_config(*overrides)
    assert isinstance(config.policy_loss, sv.STAPOPolicyLossConfig)
    opts = sv.objective_options("stapo", config)
    assert (opts["clip_low"], opts["clip_high"], opts["clip_ratio_c"], opts["loss_agg_mode"]) == (0.2, 0.28, 10.0,
                                                                                                  "token-mean")
    assert config.entropy_coeff == 0 and not config.use_kl_loss
