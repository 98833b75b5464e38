"""Set-up for a training run, once before its first step: seeds, threads, model, optimizer, rewards.

Device, dtype and the model folder's checks are the one loader's (``stapo.models.loading``); the
problems and each rank's share of them are ``stapo.data.problem_sets``'s.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, torch_dtype
from ..config.dtypes import canonical_dtype
from ..data.prompts import render_prompts, tokenize_prompt
from ..errors import UserError
from ..models import loading
from ..models.hub import resolve_model_source
from ..tasks import builtin_task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_cpu_threads(threads: int) -> None:
    """Use the free cores only: oversubscribed threads tripled CPU step times in the prototype."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals slowed CPU sampling several-fold


def base_model_path(cfg: TrainConfig, log=print) -> str:
    """The model to start from: a hub id / local path, or a built-in task's model (built once, cached)."""
    task = builtin_task(cfg.model.name_or_path)
    if task is None:  # offline, a hub id is its cached copy (or one error, at once)
        return resolve_model_source(cfg.model.name_or_path, "model.name_or_path")
    return str(task.build_model(Path(cfg.output_dir) / "_demo_base" / f"seed{cfg.seed}", seed=cfg.seed, log=log))


def _sources(cfg: TrainConfig, checkpoint: Path | None, log=None) -> tuple[str, str]:
    """(where the model's weights and config come from, where the tokenizer comes from)."""
    path = base_model_path(cfg, log)
    policy_dir = str(checkpoint / "policy") if checkpoint is not None else None
    # a LoRA checkpoint's policy/ holds the adapter (and tokenizer); the base weights stay where they were
    return (path if policy_dir is None or cfg.model.lora.r > 0 else policy_dir), policy_dir or path


def check_dtype(cfg: TrainConfig, device: torch.device, checkpoint: Path | None) -> None:
    """``model.dtype`` float16 is refused on a CPU (``loading.refuse_cpu_float16``)."""
    if device.type == "cpu":  # only ``auto`` reads the checkpoint (a built-in task's is built first)
        auto = canonical_dtype(cfg.model.dtype) == "auto"
        loading.refuse_cpu_float16(cfg.model.dtype, device, _sources(cfg, checkpoint)[0] if auto else "")


def load_policy(cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None):
    """(model, tokenizer) on ``device``; LoRA-wrapped if ``model.lora.r > 0``; weights from ``checkpoint``."""
    model_source, tokenizer_source = _sources(cfg, checkpoint)
    model = loading.load_causal_lm(model_source, torch_dtype(cfg.model.dtype), "model.name_or_path",
                                   cfg.model.trust_remote_code)
    tokenizer = loading.load_tokenizer(tokenizer_source, "model.name_or_path", cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lora.r > 0:
        model = _wrap_lora(model, cfg, checkpoint / "policy" if checkpoint is not None else None)
    return model.to(device), tokenizer


def check_prompt_lengths(cfg: TrainConfig, train_set: list, heldout: list | None, checkpoint: Path | None) -> None:
    """Every prompt plus ``rollout.max_new_tokens`` fits the model's positions. Reads the tokenizer and
    the model's config only, so a too-long prompt stops the run before any weights load; the model
    folder is checked first (``loading.check_model_folder``)."""
    from transformers import AutoConfig

    model_source, tokenizer_source = _sources(cfg, checkpoint, log=print)  # builds the demo model once
    loading.check_model_folder(model_source)
    tokenizer = loading.load_tokenizer(tokenizer_source, "model.name_or_path", cfg.model.trust_remote_code)
    try:
        model_cfg = AutoConfig.from_pretrained(model_source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot read the model config in {model_source!r}: {err}") from None
    positions = getattr(model_cfg, "max_position_embeddings", None) or getattr(model_cfg, "n_positions", None)
    if not positions:
        return
    for key, problems in (("data.train", train_set), ("data.heldout", heldout or [])):
        try:
            prompts = render_prompts(problems, tokenizer, cfg)
        except ValueError as err:  # the template does not render
            raise UserError(f"data.template / data.use_chat_template: {err}") from None
        # a token spans at least one byte of text, so only prompts with more bytes than the room left
        # (plus slack for added tokens) can overflow: tokenizing 17k prompts takes seconds
        room = positions - cfg.rollout.max_new_tokens
        suspects = [i for i, p in enumerate(prompts) if len(p.encode()) + 16 > room]
        if not suspects:
            continue
        ids = [tokenize_prompt(tokenizer, prompts[i]) for i in suspects]  # the ids training will feed
        length, i = max((len(x), i) for x, i in zip(ids, suspects))
        if length > room:
            raise UserError(
                f"{key}: problem {problems[i].id!r} has a {length}-token prompt, which with "
                f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} exceeds the model's {positions} positions "
                "(max_position_embeddings); shorten the prompt or lower rollout.max_new_tokens"
            )


def _wrap_lora(model, cfg: TrainConfig, adapter_dir: Path | None):
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError as err:
        raise ImportError("model.lora.r > 0 needs peft: pip install 'stapo[peft]'") from err
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    lc = cfg.model.lora
    return get_peft_model(
        model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules)
    )


def reward_pool(**kwargs):
    """The reward workers (``RewardPool``); a reward that cannot be used is one line naming reward.name."""
    from ..rewards import RewardPool
    from ..rewards.registry import RewardError

    try:
        return RewardPool(**kwargs)
    except RewardError as err:
        raise UserError(f"reward.name: {err}") from err


def frozen_copy(model):
    """The reference policy for the KL term: a frozen copy of the initial weights."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def build_optimizer(model, cfg: TrainConfig):
    """AdamW with a constant learning rate after linear warm-up (per training step)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    warmup = max(0, o.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if warmup == 0 else min(1.0, (s + 1) / warmup)
    )
    return optimizer, scheduler


def apply_optim_settings(optimizer, scheduler, cfg: TrainConfig) -> None:
    """Put the config's lr, weight decay and betas into a restored optimizer, so a resume's overrides
    take effect (the saved param groups would win otherwise); the lr follows the schedule at its step."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=o.lr, lr=o.lr * lr_lambda(scheduler.last_epoch),
                     weight_decay=o.weight_decay, betas=tuple(o.betas))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
