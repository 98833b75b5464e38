"""The training config schema. Defaults are the paper's (STAPO Sec. 5.1, scaled where noted).

Paper set-up: G = 8 samples, P = 256 prompts a step, mini-batch M = 64 prompts,
lr 1e-6 after 10 warm-up steps, grad clip 1.0, temperature 1.0, top-p 1.0,
clip 0.2 / 0.28, token-mean, no KL, no entropy bonus; τ_p = 0.002, q = 0.75.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

from ..objectives.configs import STAPOConfig as _S2T  # the S2T defaults' one place
from .dtypes import Dtype
from .fields import check_fields, option
from .objective import choose_objective, is_preset_override, resolve_options
from .schema import ConfigError, apply_overrides, from_dict, load_yaml


@dataclasses.dataclass
class LoraConfig:
    r: int = option(0, ge=0)  # 0 = full fine-tuning
    alpha: int = option(32, gt=0)
    dropout: float = option(0.0, ge=0, lt=1)
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclasses.dataclass
class ModelConfig:
    name_or_path: str = "demo"  # hub id or local path; "demo" builds the built-in tiny model
    dtype: Dtype = "auto"  # auto: the checkpoint's own dtype
    bf16_autocast: Literal["auto", "on", "off"] = "auto"  # "auto": on where the device supports bf16 (CUDA)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class DataConfig:
    # "demo", a preset (math_train, aime_1983_2023), a .json/.jsonl/.parquet path, a dataset folder, or
    # hf:ORG/NAME[:split] (a hub dataset, through datasets.load_dataset)
    train: str = "demo"
    data_dir: str | None = None  # else $STAPO_DATA_DIR
    problem_field: str | None = None  # for JSON inputs whose fields are not the defaults
    answer_field: str | None = None
    template: str = "boxed"  # "boxed" (paper), "dapo" ("Answer:" line), "none", or a string with {question}
    use_chat_template: Literal["auto", "on", "off"] = "auto"
    shuffle: bool = True
    heldout: str | None = "demo"  # held-out problems for in-loop eval: "demo", a path/preset, or null
    heldout_size: int = option(256, ge=1)


@dataclasses.dataclass
class RolloutConfig:
    backend: str = "hf"  # a registered rollout backend (stapo.rollout.BACKENDS): hf, vllm
    prompts_per_step: int = option(256, ge=1)  # P
    n: int = option(8, ge=1)  # G samples per prompt
    temperature: float = option(1.0, gt=0)
    top_p: float = option(1.0, gt=0, le=1)
    max_new_tokens: int = option(1024, ge=1)
    min_new_tokens: int = option(0, ge=0)  # EOS suppressed before this many tokens (min = max fixes lengths, for benchmarks)
    generation_batch_size: int = option(64, ge=1)  # sequences per generate() call (HF)
    mask_truncated: bool = False  # drop length-truncated responses from the loss
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards and refill (off, as the paper)
    max_refill_rounds: int = option(4, ge=0)
    vllm: dict[str, Any] = dataclasses.field(default_factory=dict)  # engine kwargs (gpu_memory_utilization, ...)
    tis_cap: float | None = option(None, gt=0)  # truncated importance sampling cap C on π_train/π_rollout (vLLM); null = off


@dataclasses.dataclass
class RewardConfig:
    name: str = "math"  # "math", "dapo", or a user function "module:function"
    strict: bool = False  # math: require a \boxed{} answer
    timeout: float = option(2.0, gt=0)  # hard wall-clock limit per item, seconds
    num_workers: int = option(2, ge=1)
    import_timeout: float = option(60.0, gt=0)  # seconds a worker may take to import a module:function reward
    format_weight: float = 0.0
    overlong_buffer: int | None = None  # DAPO soft overlong penalty: L_cache tokens before max_new_tokens


@dataclasses.dataclass
class ObjectiveConfig:
    name: str = "stapo"  # a key of stapo.OBJECTIVES; `preset=NAME` is the same choice
    advantage: str = "grpo"  # a key of stapo.advantages.ADVANTAGES: grpo, dr_grpo, rloo or a registered one
    # overrides of the objective's config dataclass, e.g. {prob_threshold: 0.01}; kl_coef > 0
    # loads a frozen reference copy of the initial policy for the KL term
    # (checked by that dataclass; the built config holds all of them, resolved)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # where S2T / 20-Entropy / Clip-Cov / KL-Cov take their mask statistics after the first mini-batch: "current"
    # (the paper: a no-grad pass of the current policy) or "rollout" (the rollout policy's, no pass)
    statistics: Literal["current", "rollout"] = "current"


@dataclasses.dataclass
class OptimConfig:
    lr: float = option(1e-6, gt=0)
    warmup_steps: int = option(10, ge=0)
    weight_decay: float = option(0.0, ge=0)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = option(1.0, gt=0)
    mini_batch_prompts: int = option(64, ge=1)  # M: prompts per optimizer step
    micro_batch_size: int = option(16, ge=1)  # sequences per forward/backward (gradient accumulation)
    ppo_epochs: int = option(1, ge=1)
    max_nonfinite_steps: int = option(5, ge=1)  # consecutive skipped steps before the run stops


@dataclasses.dataclass
class DiagnosticsConfig:
    enabled: bool = True
    prob_threshold: float = option(_S2T.prob_threshold, gt=0, lt=1)  # quadrant cut on p (S2T's τ_p)
    entropy_quantile: float = option(_S2T.entropy_quantile, ge=0, le=1)  # quadrant cut on H (S2T's q)
    dump_every: int = option(0, ge=0)  # write a rollout parquet every k steps; 0 = never


@dataclasses.dataclass
class ParallelConfig:
    # none: one process. ddp / fsdp2: under torchrun; world size and backend come from the environment
    strategy: Literal["none", "ddp", "fsdp2"] = "none"


@dataclasses.dataclass
class DistillConfig:
    # teacher context of the self-distillation objectives (dasd, opsd, dasd_reverse; see docs/dasd.md):
    # a name in stapo.distill.HINT_TEMPLATES ("reference", "demo") or a string with {question} and {hint}
    hint_template: str = "reference"
    answer_template: str = "The final answer is {answer}."  # the hint when a record has no meta["solution"]


@dataclasses.dataclass
class ReuseConfig:
    # rollout reuse with Dynamic Gradient Gating (DGG, arXiv 2605.19425; docs/dgg.md). none: each rollout
    # batch is used once (the plain trainer); fixed: K passes; dgg: up to K passes, each optimizer step
    # vetoed when the z-score of the lm_head gradient's squared norm exceeds z_threshold (pass >= 2).
    # A pass is optim.ppo_epochs sweeps over the mini-batches, so a batch sees up to K·ppo_epochs sweeps.
    gate: Literal["none", "fixed", "dgg"] = "none"
    max_reuse: int = option(4, ge=1)  # K
    window: int = option(8, ge=2)  # W: accepted optimizer steps in the sliding window (persists across batches)
    z_threshold: float = 0.5  # τ
    statistic: Literal["norm", "increment"] = "norm"  # window of g, or of its step-to-step increment Δg
    eps: float = option(1e-8, gt=0)  # z = (x − mean) / (std + eps), std with n − 1


@dataclasses.dataclass
class TrainConfig:
    steps: int = option(200, ge=1)
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None  # default: "<objective>-s<seed>-<time>"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: int = option(0, ge=0)  # torch CPU threads; 0 = all free cores
    save_every: int = option(50, ge=1)
    keep_last: int = option(2, ge=1)
    eval_every: int = option(0, ge=0)  # 0 = only before and after training
    eval_samples: int = option(1, ge=1)  # samples per held-out problem at the rollout temperature
    # console (progress bar / plain lines) and experiment trackers: any of console, wandb, trackio,
    # mlflow, tensorboard; each tracker is an extra (pip install 'stapo[wandb]'), see trainer/trackers.py
    logger: list[str] = dataclasses.field(default_factory=lambda: ["console"])
    project: str = "stapo"  # the trackers' project / experiment name; the run is run_name
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    diagnostics: DiagnosticsConfig = dataclasses.field(default_factory=DiagnosticsConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    reuse: ReuseConfig = dataclasses.field(default_factory=ReuseConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)


# The built-in demo: the paper's recipe scaled to a 0.5M-parameter model on 2 CPU cores
# (lr raised from 1e-6 and batch shrunk; see README "Demo").
DEMO: dict[str, Any] = {
    "steps": 400,
    "save_every": 50,
    "eval_every": 50,
    "eval_samples": 4,
    "model": {"name_or_path": "demo"},
    "data": {"train": "demo", "heldout": "demo", "template": "none", "heldout_size": 256},
    "rollout": {"prompts_per_step": 16, "n": 8, "max_new_tokens": 40, "generation_batch_size": 128},
    "optim": {"lr": 5e-5, "warmup_steps": 0, "mini_batch_prompts": 4, "micro_batch_size": 64},  # M = P/4, as 256/64
    "diagnostics": {"dump_every": 50},
    "distill": {"hint_template": "demo"},  # only read by the self-distillation objectives
}


def build_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Config from the demo defaults (no path) or a YAML file, then ``a.b=v`` overrides.

    Precedence (``stapo.config.objective``): the file (its own ``preset:`` under it), then an objective
    chosen on the command line (``preset=X`` or ``objective.name=X``, with X's own defaults), then
    the command line's keys. The objective's options are checked by its config dataclass and stored
    resolved, so ``cfg.objective.options`` (and the run's ``config.yaml``) hold every setting in force.
    """
    overrides = list(overrides or [])
    data: dict[str, Any] = copy.deepcopy(DEMO) if path is None else load_yaml(path)
    data = choose_objective(data, overrides)
    data = apply_overrides(data, [o for o in overrides if not is_preset_override(o)])
    cfg = from_dict(TrainConfig, data)
    _validate(cfg)
    return cfg


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _validate(cfg: TrainConfig) -> None:
    from ..objectives import OBJECTIVES, get_objective

    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(
            f"config key 'objective.name' must be one of {', '.join(OBJECTIVES)}; got {cfg.objective.name!r}"
        )
    check_fields(cfg)  # every key's type and declared range, before anything divides by one
    from ..rollout.backends import BACKENDS

    if cfg.rollout.backend not in BACKENDS:
        raise ConfigError(f"config key 'rollout.backend' must be one of {', '.join(map(repr, BACKENDS))}; "
                          f"got {cfg.rollout.backend!r}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1); got {betas!r}")
    resolve_options(cfg)  # the objective's own config dataclass checks objective.options
    from ..advantages import ADVANTAGES

    if cfg.objective.advantage not in ADVANTAGES:
        raise ConfigError(f"config key 'objective.advantage' must be one of {', '.join(map(repr, ADVANTAGES))}; "
                          f"got {cfg.objective.advantage!r}")
    r, o = cfg.rollout, cfg.optim
    checks = [
        (r.prompts_per_step % o.mini_batch_prompts == 0,
         (f"rollout.prompts_per_step ({r.prompts_per_step}) must be a multiple of "
          f"optim.mini_batch_prompts ({o.mini_batch_prompts})")),
        (r.min_new_tokens <= r.max_new_tokens, "rollout.min_new_tokens must be in [0, rollout.max_new_tokens]"),
        (cfg.reward.overlong_buffer is None or 0 <= cfg.reward.overlong_buffer <= r.max_new_tokens,
         "reward.overlong_buffer must be in [0, rollout.max_new_tokens] (0 or null: no penalty)"),
        (not (r.backend == "vllm" and cfg.parallel.strategy == "fsdp2"),
         "rollout.backend=vllm with parallel.strategy=fsdp2 is not supported (weights are sharded); use ddp"),
        (not (r.backend == "vllm" and cfg.model.lora.r > 0),
         "rollout.backend=vllm with model.lora.r > 0 is not supported yet: merge-and-push of adapters is missing"),
        (cfg.parallel.strategy == "none" or (r.prompts_per_step % _world() == 0
                                              and o.mini_batch_prompts % _world() == 0),
         "rollout.prompts_per_step and optim.mini_batch_prompts must be multiples of the world size"),
        (cfg.reuse.gate != "dgg" or cfg.model.lora.r == 0,
         "reuse.gate=dgg gates on the lm_head gradient, but LoRA (model.lora.r > 0) freezes the lm_head"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    from ..trainer.trackers import missing_tracker

    if (problem := missing_tracker(cfg.logger)) is not None:
        raise ConfigError(problem)
    if get_objective(cfg.objective.name).needs_teacher:  # self-distillation: the teacher context must render
        from ..distill import check_templates

        try:
            check_templates(cfg.distill.hint_template, cfg.distill.answer_template)
        except ValueError as err:
            raise ConfigError(str(err)) from None
