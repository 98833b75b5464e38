"""Set-up for a training run: device, model, optimizer, data, run directory."""

from __future__ import annotations

import copy
import datetime
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import TrainConfig, to_dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def rank_device(device: torch.device, ctx) -> torch.device:
    """One GPU per rank (LOCAL_RANK) when running distributed on CUDA."""
    if device.type == "cuda" and ctx.enabled and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


def shard(items: list, ctx) -> list:
    """This rank's contiguous share of a list (whole prompts, so a group never straddles ranks)."""
    if ctx.world_size == 1:
        return items
    if len(items) % ctx.world_size:
        raise ValueError(f"{len(items)} items cannot be split evenly over {ctx.world_size} ranks")
    k = len(items) // ctx.world_size
    return items[ctx.rank * k : (ctx.rank + 1) * k]


def set_cpu_threads(threads: int) -> None:
    """Use the free cores only: oversubscribed threads tripled CPU step times in the prototype."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals slowed CPU sampling several-fold


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast where the device supports it (``model.bf16_autocast``)."""
    mode = cfg.model.bf16_autocast
    on = mode == "on" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def make_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{cfg.objective.name}-s{cfg.seed}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output_dir) / name
    if (run_dir / "checkpoints").exists():
        raise FileExistsError(f"run directory {run_dir} already has checkpoints; use `--resume {run_dir}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def base_model_path(cfg: TrainConfig, log=print) -> str:
    """The model to start from: a hub id / local path, or a built-in demo task's model (built once, cached)."""
    from ..demo.tasks import TASKS

    if cfg.model.name_or_path not in TASKS:
        return cfg.model.name_or_path
    from ..demo.assets import build_base_model

    return str(build_base_model(Path(cfg.output_dir) / "_demo_base" / f"seed{cfg.seed}",
                                task=cfg.model.name_or_path, seed=cfg.seed, log=log))


def load_policy(cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None, log=print):
    """(model, tokenizer) on ``device``; LoRA-wrapped if ``model.lora.r > 0``; weights from ``checkpoint``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_model_path(cfg, log)
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    policy_dir = checkpoint / "policy" if checkpoint is not None else None
    lora = cfg.model.lora.r > 0
    load_from = str(policy_dir) if policy_dir is not None and not lora else path
    model = AutoModelForCausalLM.from_pretrained(
        load_from, dtype=dtype[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(policy_dir) if policy_dir is not None else path, trust_remote_code=cfg.model.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        model = _wrap_lora(model, cfg, policy_dir)
    return model.to(device), tokenizer


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


def load_problem_sets(cfg: TrainConfig):
    """(train problems, held-out problems or None)."""
    d = cfg.data
    return _load(d.train, cfg, "train"), (_load(d.heldout, cfg, "heldout")[: d.heldout_size] if d.heldout else None)


def _load(spec: str, cfg: TrainConfig, split: str):
    from ..demo.tasks import TASKS

    if spec in TASKS:  # a built-in demo task ("demo", "demo_words")
        n = 4096 if split == "train" else cfg.data.heldout_size
        return TASKS[spec].make_problems(n, seed=cfg.seed, split=split)
    from ..data import load_problems

    fields = {}
    if cfg.data.problem_field:
        fields["problem_field"] = cfg.data.problem_field
    if cfg.data.answer_field:
        fields["answer_field"] = cfg.data.answer_field
    return load_problems(spec, data_dir=cfg.data.data_dir, **fields)


def render_prompts(problems: list, tokenizer, cfg: TrainConfig) -> list[str]:
    from ..data import build_prompt

    chat = {"auto": "auto", "on": True, "off": False}[cfg.data.use_chat_template]
    return [build_prompt(p, tokenizer, template=cfg.data.template, use_chat_template=chat) for p in problems]
