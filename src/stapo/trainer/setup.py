"""Set-up for a training run: device, model, optimizer, data, run directory."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, torch_dtype
from ..config.dtypes import canonical_dtype
from ..data.prompts import tokenize_prompt
from ..errors import UserError
from ..models.hub import looks_like_hub_id, resolve_model_source


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


def base_model_path(cfg: TrainConfig, log=print) -> str:
    """The model to start from: a hub id / local path, or a built-in demo task's model (built once, cached)."""
    from ..demo.tasks import TASKS

    if cfg.model.name_or_path not in TASKS:  # offline, a hub id is its cached copy (or one error, at once)
        return resolve_model_source(cfg.model.name_or_path, "model.name_or_path")
    from ..demo.assets import build_base_model

    return str(build_base_model(Path(cfg.output_dir) / "_demo_base" / f"seed{cfg.seed}",
                                task=cfg.model.name_or_path, seed=cfg.seed, log=log))


def _sources(cfg: TrainConfig, checkpoint: Path | None, log=None) -> tuple[str, str]:
    """(where the model's weights and config come from, where the tokenizer comes from)."""
    path = base_model_path(cfg, log)
    policy_dir = str(checkpoint / "policy") if checkpoint is not None else None
    # a LoRA checkpoint's policy/ holds the adapter (and tokenizer); the base weights stay where they were
    return (path if policy_dir is None or cfg.model.lora.r > 0 else policy_dir), policy_dir or path


def load_tokenizer(cfg: TrainConfig, source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:  # not a local folder nor a reachable hub id; no tokenizer files
        raise UserError(f"model.name_or_path: cannot load a tokenizer from {source!r}: {err}") from None
    if tokenizer.pad_token_id is None:  # batches are padded: eos stands in, as TRL does
        if tokenizer.eos_token is None:
            raise UserError(f"model.name_or_path: the tokenizer in {source!r} has neither a pad token nor an "
                            "eos token; set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_dtype(cfg: TrainConfig, device: torch.device, checkpoint: Path | None) -> None:
    """float16 does not train on a CPU (no loss scaling: the first step goes non-finite and sampling
    breaks), so it is refused before the model loads; ``auto`` is the checkpoint's own dtype."""
    if device.type != "cpu":
        return
    dtype, origin = canonical_dtype(cfg.model.dtype), f"model.dtype={cfg.model.dtype}"
    if dtype == "auto":
        config = Path(_sources(cfg, checkpoint)[0]) / "config.json"
        saved = _read_json(config) if config.is_file() else {}
        dtype = str(saved.get("dtype") or saved.get("torch_dtype") or "auto")
        origin = f"model.dtype=auto is the checkpoint's {dtype}, which"
    if dtype == "float16":
        raise UserError(f"{origin} does not train on a CPU (its first step overflows to inf/nan); "
                        "use model.dtype=float32 or bfloat16 on a CPU, float16 on a GPU")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: {path} is not valid JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def check_model_folder(source: str) -> None:
    """A local model folder holds a config.json and weights that are whole (safetensors headers
    against file sizes: a truncated download or copy is named before anything loads)."""
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_id(source):
            return  # a hub id, with the hub reachable
        raise UserError(f"model.name_or_path: {source}: no such folder")
    if not path.is_dir():
        raise UserError(f"model.name_or_path: {source} is a file, not a model folder (save_pretrained's)")
    if not (path / "config.json").is_file():
        raise UserError(f"model.name_or_path: {source} is a folder but not a model: it has no config.json "
                        "(expected a save_pretrained folder or a hub id)")
    _read_json(path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        shards = ["model.safetensors"] if (path / "model.safetensors").is_file() else []
    if not shards and not any(path.glob("pytorch_model*.bin")):
        raise UserError(f"model.name_or_path: {source} has a config.json but no weights "
                        "(model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    for shard in shards:
        if problem := _safetensors_problem(path / shard):
            raise UserError(f"model.name_or_path: {path / shard}: {problem}; copy or download it again")


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (None: header and size agree)."""
    if not file.is_file():
        return "missing (named in model.safetensors.index.json)"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            return f"{size} bytes, too short for its own header: truncated or not a safetensors file"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its header is not valid JSON: truncated or not a safetensors file"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and len(v.get("data_offsets", ())) == 2]
    need = 8 + n + max(ends, default=0)
    return f"{size} bytes, but its header describes {need}: truncated" if need > size else None


def load_policy(cfg: TrainConfig, device: torch.device, checkpoint: Path | None = None):
    """(model, tokenizer) on ``device``; LoRA-wrapped if ``model.lora.r > 0``; weights from ``checkpoint``."""
    from transformers import AutoModelForCausalLM

    model_source, tokenizer_source = _sources(cfg, checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        model_source, dtype=torch_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
    )
    tokenizer = load_tokenizer(cfg, tokenizer_source)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lora.r > 0:
        model = _wrap_lora(model, cfg, checkpoint / "policy" if checkpoint is not None else None)
    return model.to(device), tokenizer


def check_prompt_lengths(cfg: TrainConfig, train_set: list, heldout: list | None, checkpoint: Path | None) -> None:
    """Every prompt plus ``rollout.max_new_tokens`` fits the model's positions. Reads the tokenizer and
    the model's config only, so a too-long prompt stops the run before any weights load; the model
    folder is checked first (``check_model_folder``)."""
    from transformers import AutoConfig

    model_source, tokenizer_source = _sources(cfg, checkpoint, log=print)  # builds the demo model once
    check_model_folder(model_source)
    tokenizer = load_tokenizer(cfg, tokenizer_source)
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


def load_problem_sets(cfg: TrainConfig):
    """(train problems, held-out problems or None); an empty set is an error naming its key."""
    d = cfg.data
    train_set = _load(d.train, cfg, "train")
    heldout = _load(d.heldout, cfg, "heldout")[: d.heldout_size] if d.heldout else None
    for key, spec, problems in (("data.train", d.train, train_set), ("data.heldout", d.heldout, heldout)):
        if problems is not None and not problems:
            raise UserError(f"{key}: {spec!r} holds no problems")
    return train_set, heldout


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
