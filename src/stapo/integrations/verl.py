"""STAPO inside verl: ``actor_rollout_ref.actor.policy_loss.loss_mode=stapo`` (and ``entropy20``).

Shapes, per DP rank (verl's no-padding layout; docs/verl.md has the long version):
    B sequences of the mini-batch (or micro-batch), T = max response length of the step
    response_mask, old_log_probs, advantages, log_prob, entropy   [B, T] (dense, right-padded)
    model_output["log_probs"], model_output["entropy"]            nested [B, prompt + response]

How it hooks into verl 0.9 (no fork; everything happens at import, in every process that imports it):

1. Registration. ``stapo`` and ``entropy20`` join verl's ``POLICY_LOSS_REGISTRY``. Each is
   ``stapo.policy_loss`` on the tensors verl passes, with verl's clip settings (``clip_ratio_low`` /
   ``clip_ratio_high`` / ``clip_ratio_c``, ``loss_agg_mode``) and the S2T options of
   ``STAPOPolicyLossConfig`` (``tau_p``, ``entropy_quantile``; ``top_ratio``, ``normalize_by``).
2. Entropy and τ_h. verl's ``ppo_loss`` hands a policy loss no entropy. ``BaseEngine.train_batch``
   (one call per optimizer mini-batch on each DP rank) is wrapped: when its loss is verl's
   ``ppo_loss`` with one of these loss modes it (a) forces ``calculate_entropy``, (b) runs a no-grad
   pre-pass over the whole mini-batch with the current weights (``engine.infer_batch``, the
   engine's own forward, micro-batched as training), (c) plans the mini-batch with
   ``stapo.plan_minibatch``, the planner stapo's own trainer and the TRL integration call
   (``minibatch_statistics``: τ_h over the S2T candidates of the mini-batch on all DP ranks, and the
   global kept-token count), and (d) trains with ``ppo_loss_with_entropy``: verl's own ``ppo_loss``
   with the micro-batch's entropy routed to the registered loss. Cost: one extra no-grad forward
   per mini-batch.
3. Normaliser. verl's token-mean divides by all valid tokens of the mini-batch and multiplies by
   the DP size (FSDP averages gradients over ranks). S2T drops silenced tokens from the count too,
   so the registered loss divides by the kept units of the mini-batch on all ranks instead. With
   ``use_kl_loss`` or ``entropy_coeff != 0``, verl's KL loss and entropy bonus see the same tokens
   and the same count (a silenced token gets no gradient from them), as stapo's own KL does.
4. Metrics. stapo's metrics are logged as ``stapo/*`` (``stapo/entropy``, ``stapo/clip_frac_high``,
   ``stapo/policy``), ``s2t/*`` and ``entropy20/*``, beside verl's own ``actor/*``.
5. Loud failures. Importing this module under a verl outside ``TESTED_VERL`` raises (and logs at
   ERROR, since verl's entry-point loader hides import errors at DEBUG). A ``stapo`` / ``entropy20``
   loss called outside the hook (another loss path, distillation, a verl that moved the call)
   raises instead of training without the mask; so do rollout correction (IS weights),
   ``algorithm.rollout_correction.bypass_mode=True`` and ``clip_ratio_c <= 1`` (checked by verl's
   ``validate_config`` in the driver, before any worker starts; ``check_trainer_config``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from typing import Any, NamedTuple

import torch

try:
    import verl
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError("stapo.integrations.verl needs verl: pip install 'stapo[verl]'") from err

from ..config.schema import ValueRefused
from ..distributed import all_reduce_sum, gather_variable
from ..objectives import (
    AGG_MODES,
    Entropy20Config,
    STAPOConfig,
    TokenStats,
    get_objective,
    plan_minibatch,
    policy_loss,
)
from ..objectives.registry import denominator_token_mask, objective_keep_mask

__all__ = [
    "CONFIG_DIR",
    "LOSS_MODES",
    "NOT_INSTALLED",
    "TESTED_VERL",
    "MiniBatch",
    "STAPOPolicyLossConfig",
    "check_trainer_config",
    "check_verl_version",
    "minibatch_scope",
    "minibatch_statistics",
    "objective_options",
    "pass_through_installed",
    "ppo_loss_with_entropy",
    "verl_policy_loss",
]

TESTED_VERL = ">=0.9.1,<0.10"  # keep equal to the `verl` extra in pyproject.toml
# stapo_trainer.yaml: verl's ppo_trainer with STAPOPolicyLossConfig selected (for --config-path)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verl_config")
LOSS_MODES = ("stapo", "entropy20")
NOT_INSTALLED = (
    "loss_mode={mode!r} reached verl's policy loss without stapo's entropy pass-through (the S2T mask "
    "needs per-token entropy and the mini-batch-wide threshold, which only stapo.integrations.verl's "
    "BaseEngine.train_batch hook provides). Import stapo.integrations.verl in every worker (VERL_USE_EXTERNAL_MODULES="
    "stapo.integrations.verl, the verl.plugins entry point, or actor_rollout_ref.model.external_lib) and train "
    "through verl's ppo_loss; distillation losses are not supported. Refusing to train without the mask."
)
_log = logging.getLogger(__name__)


def check_verl_version(version: str | None = None) -> str:
    """The installed (or given) verl version; RuntimeError when it is outside ``TESTED_VERL``."""
    from packaging.specifiers import SpecifierSet

    version = verl.__version__ if version is None else version
    if not SpecifierSet(TESTED_VERL).contains(version, prereleases=True):
        raise RuntimeError(
            f"stapo.integrations.verl supports verl{TESTED_VERL} (the `stapo[verl]` extra) but verl {version} is "
            "installed. It hooks verl internals (ppo_loss, BaseEngine.train_batch, register_policy_loss) that change "
            "between releases, so loss_mode=stapo is refused rather than trained without the S2T mask; install "
            "'verl>=0.9.1,<0.10'."
        )
    return version


try:
    check_verl_version()
except RuntimeError as err:
    _log.error("%s", err)  # verl's entry-point loader swallows import errors at DEBUG level
    raise

from verl.trainer.ppo import core_algos, rollout_corr_helper
from verl.utils import config as verl_config_utils
from verl.utils import tensordict_utils as tu
from verl.workers.config import PolicyLossConfig
from verl.workers.engine.base import BaseEngine
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import no_padding_2_padding


@dataclasses.dataclass
class STAPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus the S2T / 20-Entropy options, settable from verl's command line:

    ``actor_rollout_ref.actor.policy_loss._target_=stapo.integrations.verl.STAPOPolicyLossConfig``
    ``actor_rollout_ref.actor.policy_loss.loss_mode=stapo``
    ``actor_rollout_ref.actor.policy_loss.tau_p=0.002 ...entropy_quantile=0.75``
    """

    # the defaults are the stapo objectives' (stapo.objectives.STAPOConfig / Entropy20Config)
    loss_mode: str = "stapo"
    tau_p: float = STAPOConfig.prob_threshold  # S2T: a positive-advantage token with p < τ_p is a candidate
    entropy_quantile: float = STAPOConfig.entropy_quantile  # S2T: candidates below this quantile are silenced
    top_ratio: float = Entropy20Config.top_ratio  # entropy20: train on the top-ratio entropy tokens of the mini-batch
    normalize_by: str = Entropy20Config.normalize_by  # entropy20: divide by the kept tokens ("selected") or all

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):  # verl 0.9.1's PolicyLossConfig has none; a later one may
            super().__post_init__()
        for name in ("tau_p", "entropy_quantile", "top_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # written so NaN fails too
                raise ValueError(f"actor_rollout_ref.actor.policy_loss.{name} must be in [0, 1], got {value}")
        if self.normalize_by not in ("selected", "all"):
            raise ValueError("actor_rollout_ref.actor.policy_loss.normalize_by must be 'selected' or 'all', "
                             f"got {self.normalize_by!r}")


# verl field of STAPOPolicyLossConfig -> stapo objective option, per loss mode
_POLICY_LOSS_FIELDS = {
    "stapo": {"tau_p": "prob_threshold", "entropy_quantile": "entropy_quantile"},
    "entropy20": {"top_ratio": "top_ratio", "normalize_by": "normalize_by"},
}


def objective_options(name: str, config, loss_agg_mode: str | None = None) -> dict[str, Any]:
    """stapo objective options from verl's ``ActorConfig`` (clip range, dual clip, aggregation, S2T fields).

    Fields a plain ``PolicyLossConfig`` lacks keep the paper defaults of the stapo objective.
    """
    mode = config.loss_agg_mode if loss_agg_mode is None else loss_agg_mode
    if mode not in AGG_MODES:
        raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode={mode!r} is not supported with loss_mode={name!r}; "
                         f"choose one of {', '.join(AGG_MODES)}")
    clip = config.clip_ratio
    opts = {
        "clip_low": clip if config.clip_ratio_low is None else config.clip_ratio_low,
        "clip_high": clip if config.clip_ratio_high is None else config.clip_ratio_high,
        "clip_ratio_c": config.clip_ratio_c,
        "loss_agg_mode": mode,
        "norm_length": config.loss_scale_factor,
        "kl_coef": 0.0,  # verl's ppo_loss adds its own KL loss (use_kl_loss)
    }
    defaults = get_objective(name).config()
    for verl_field, option in _POLICY_LOSS_FIELDS[name].items():
        opts[option] = config.policy_loss.get(verl_field, getattr(defaults, option))
    _check_options(name, opts)
    return opts


def _check_options(name: str, opts: dict[str, Any]) -> None:
    """The objective's own ranges (its dual clip needs c > 1, as verl's loss asserts), named as verl's keys."""
    try:
        get_objective(name).config(**opts)
    except ValueRefused as err:
        fields = {stapo: f"policy_loss.{verl}" for verl, stapo in _POLICY_LOSS_FIELDS[name].items()}
        key = {"clip_low": "clip_ratio_low", "clip_high": "clip_ratio_high", "norm_length": "loss_scale_factor",
               **fields}.get(err.key, err.key)
        raise ValueError(f"actor_rollout_ref.actor.{key} {err.problem} (loss_mode={name!r})") from None


def check_trainer_config(config) -> None:
    """Refuse, before any worker starts, what verl would train past the S2T mask with a stapo loss mode.

    ``config``: verl's whole trainer config (``main_ppo``'s). Checked from ``validate_config`` and
    ``apply_bypass_mode`` (both wrapped at import).
    """
    actor = config.actor_rollout_ref.actor
    name = actor.policy_loss.get("loss_mode", "vanilla")
    if name not in LOSS_MODES:
        return
    correction = (config.get("algorithm") or {}).get("rollout_correction") or {}
    if correction.get("bypass_mode", False):
        raise ValueError(_BYPASS.format(mode=name))
    _check_options(name, {"clip_ratio_c": actor.get("clip_ratio_c")})


_BYPASS = ("algorithm.rollout_correction.bypass_mode=True replaces loss_mode={mode!r} with verl's bypass_mode loss "
           "(old_log_probs = the rollout's), which applies no S2T mask; set bypass_mode=False with loss_mode={mode!r}")


class MiniBatch(NamedTuple):
    """What the whole mini-batch decides, on all DP ranks (set by the ``train_batch`` hook)."""

    overrides: dict[str, Any]  # e.g. {"entropy_threshold": τ_h}
    denominator: float  # the objective's loss units (kept tokens for token-mean) over the mini-batch, all ranks


class _MicroBatch(NamedTuple):
    entropy: torch.Tensor  # [B, T] detached, this micro-batch
    minibatch: MiniBatch
    response_mask: torch.Tensor  # [B, T] bool: the valid tokens (verl's KL / entropy terms may see fewer)


_MINIBATCH: contextvars.ContextVar[MiniBatch | None] = contextvars.ContextVar("stapo_verl_minibatch", default=None)
_MICROBATCH: contextvars.ContextVar[_MicroBatch | None] = contextvars.ContextVar("stapo_verl_micro", default=None)


@contextlib.contextmanager
def minibatch_scope(minibatch: MiniBatch):
    """Every ``ppo_loss_with_entropy`` call inside uses ``minibatch``'s τ_h and denominator."""
    token = _MINIBATCH.set(minibatch)
    try:
        yield minibatch
    finally:
        _MINIBATCH.reset(token)


def verl_policy_loss(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                     config=None, rollout_is_weights=None):
    """verl's ``PolicyLossFn`` contract for objective ``name``: ``stapo.policy_loss`` -> (loss, metrics)."""
    micro = _MICROBATCH.get()
    if micro is None:
        raise RuntimeError(NOT_INSTALLED.format(mode=name))
    if rollout_is_weights is not None:
        raise NotImplementedError(
            f"loss_mode={name!r} does not support rollout correction weights (rollout_is_weights); turn "
            "algorithm.rollout_correction off"
        )
    opts = objective_options(name, config, loss_agg_mode)
    loss, metrics = policy_loss(name, log_prob, old_log_prob, advantages, micro.response_mask, entropy=micro.entropy,
                                denominator=micro.minibatch.denominator, **opts, **micro.minibatch.overrides)
    # verl's agg_loss convention: FSDP / DDP average gradients over DP ranks, so scale the global mean by dp_size
    dp_size = config.global_batch_info.get("dp_size", 1)
    return loss * dp_size, {metric_name(key): float(value) for key, value in metrics.items()}


def metric_name(key: str) -> str:
    """stapo's metric ``key`` under a name of its own in verl's logs (``actor/entropy`` is verl's already):
    ``actor/x`` and ``loss/x`` become ``stapo/x``; ``s2t/*`` and ``entropy20/*`` are stapo's own."""
    section, _, rest = key.partition("/")
    return f"stapo/{rest}" if section in ("actor", "loss") else key


for _mode in LOSS_MODES:
    core_algos.register_policy_loss(_mode)(functools.partial(verl_policy_loss, _mode))


def ppo_loss_with_entropy(config, model_output, data, dp_group=None):
    """verl's own ``ppo_loss``, with this micro-batch's entropy routed to the stapo policy loss."""
    mode = config.policy_loss.get("loss_mode", "vanilla")
    minibatch = _MINIBATCH.get()
    if minibatch is None:
        raise RuntimeError(NOT_INSTALLED.format(mode=mode))
    entropy = model_output.get("entropy", None)
    if entropy is None:
        raise RuntimeError(f"loss_mode={mode!r}: the model output has no entropy; the engine ignored "
                           "calculate_entropy=True")
    entropy = no_padding_2_padding(entropy, data).detach()
    dense = data.select("response_mask", "advantages").to_padded_tensor()  # [B, T] each
    valid = dense["response_mask"].bool()
    if config.use_kl_loss or config.entropy_coeff != 0:
        log_prob = no_padding_2_padding(model_output["log_probs"], data).detach()
        data = _loss_tokens_only(config, data, minibatch, log_prob, entropy, dense["advantages"], valid)
    token = _MICROBATCH.set(_MicroBatch(entropy, minibatch, valid))
    try:
        return verl_losses.ppo_loss(config, model_output, data, dp_group)
    finally:
        _MICROBATCH.reset(token)


def _loss_tokens_only(config, data, minibatch: MiniBatch, log_prob, entropy, advantages, valid):
    """A shallow copy of ``data`` whose ``response_mask`` holds the tokens the stapo loss normalises over
    and whose global count is the mini-batch's: verl's KL loss and entropy bonus then act where the
    policy loss does (no gradient at a silenced token), normalised as it is, as stapo's own KL is."""
    name = config.policy_loss.loss_mode
    spec = get_objective(name)
    cfg = spec.config(**objective_options(name, config), **minibatch.overrides)
    keep = objective_keep_mask(spec, cfg, log_prob, entropy, advantages, valid)
    out = data.copy()
    out["response_mask"] = denominator_token_mask(spec, cfg, keep, valid).to(data["response_mask"].dtype)
    count = "batch_num_tokens" if cfg.loss_agg_mode == "token-mean" else "global_batch_size"
    tu.assign_non_tensor(out, **{count: max(int(minibatch.denominator), 1)})
    return out


def minibatch_statistics(name: str, opts: dict[str, Any], logprobs: torch.Tensor, entropy: torch.Tensor,
                         advantages: torch.Tensor, response_mask: torch.Tensor, group=None) -> MiniBatch:
    """τ_h (the objective's mini-batch overrides) and the loss denominator over this rank's [B, T]
    mini-batch statistics and those of every rank of ``group`` (the DP group): ``stapo.plan_minibatch``,
    the planner stapo's own trainer and the TRL integration use."""
    spec = get_objective(name)
    stats = [TokenStats(logprobs.float(), entropy.float(), advantages, response_mask.bool())]
    plan = plan_minibatch(spec, spec.config(**opts), stats, gather=functools.partial(gather_variable, group=group),
                          all_reduce=functools.partial(all_reduce_sum, group=group))
    return MiniBatch(plan.overrides, plan.denominator)


def _stapo_config(loss_function):
    """verl's ActorConfig when ``loss_function`` is verl's ``ppo_loss`` with a stapo loss mode, else None."""
    if not (isinstance(loss_function, functools.partial) and loss_function.func is verl_losses.ppo_loss):
        return None
    config = loss_function.keywords.get("config")
    if config is None or config.policy_loss.get("loss_mode", "vanilla") not in LOSS_MODES:
        return None
    return config


def _prepass(engine: BaseEngine, data, name: str, opts: dict[str, Any]) -> MiniBatch:
    """No-grad forward over the mini-batch with the current weights -> its mini-batch-wide statistics."""
    probe = data.copy()  # shallow: the pre-pass's bookkeeping keys stay off the training batch
    output = engine.infer_batch(probe, loss_function=None) or {}
    model_output = output.get("model_output") or {}
    if "entropy" not in model_output or "log_probs" not in model_output:
        raise RuntimeError(
            f"loss_mode={name!r}: the S2T pre-pass returned no log-probs / entropy on this rank (engine "
            f"{type(engine).__name__}); only engines whose every data-parallel rank holds the model output "
            "(FSDP, no pipeline parallelism) are supported"
        )
    dense = data.select("response_mask", "advantages").to_padded_tensor()  # [B, T] each
    return minibatch_statistics(
        name, opts, no_padding_2_padding(model_output["log_probs"], data),
        no_padding_2_padding(model_output["entropy"], data), dense["advantages"], dense["response_mask"],
        group=engine.get_data_parallel_group(),
    )


def _install() -> None:
    original = BaseEngine.train_batch
    if getattr(original, "_stapo_hook", False):
        return

    @functools.wraps(original)
    def train_batch(self, data, loss_function):
        config = _stapo_config(loss_function)
        if config is None:
            return original(self, data, loss_function)
        name = config.policy_loss.loss_mode
        opts = objective_options(name, config)
        tu.assign_non_tensor(data, calculate_entropy=True)
        with minibatch_scope(_prepass(self, data, name, opts)):
            return original(self, data, functools.partial(ppo_loss_with_entropy, config=config))

    train_batch._stapo_hook = True
    BaseEngine.train_batch = train_batch
    _check_before(verl_config_utils, "validate_config", lambda config, *a, **k: check_trainer_config(config))
    _check_before(rollout_corr_helper, "apply_bypass_mode", _refuse_bypass)


def _check_before(module, attr: str, check) -> None:
    """``module.attr`` runs ``check`` with its arguments first (``main_ppo`` imports them after this module)."""
    original = getattr(module, attr)

    @functools.wraps(original)
    def checked(*args, **kwargs):
        check(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(module, attr, checked)


def _refuse_bypass(batch=None, rollout_corr_config=None, policy_loss_config=None):
    mode = (policy_loss_config or {}).get("loss_mode", "vanilla")
    if mode in LOSS_MODES:
        raise ValueError(_BYPASS.format(mode=mode))


def pass_through_installed() -> bool:
    """True when verl's ``BaseEngine.train_batch`` carries the stapo hook in this process."""
    return getattr(BaseEngine.train_batch, "_stapo_hook", False)


_install()
