"""The one model loader of training, evaluation and diagnostics: device, dtype, model folder, tokenizer.

    device = resolve_device("auto")                          # cuda if there is one, else cpu
    check_model_folder(path)                                 # config.json and whole weights, or one error
    tokenizer = load_tokenizer(path, key="--model")          # with a pad token (eos stands in)
    model = load_causal_lm(path, eval_dtype("auto", device), key="--model")

Every failure a user can fix is a ``UserError`` naming ``key`` (the config key or flag that gave the path).
What ``auto`` means for a dtype: training loads the checkpoint's own (``torch_dtype``); evaluation takes
bf16 where the device has it, else fp32 (``eval_dtype``). The bf16 rule is ``bf16_supported``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config.dtypes import canonical_dtype, torch_dtype
from ..errors import UserError
from .hub import looks_like_hub_id

MODEL_KEY = "model.name_or_path"


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def rank_device(device: torch.device, ctx) -> torch.device:
    """One GPU per rank (LOCAL_RANK) when running distributed on CUDA."""
    if device.type == "cuda" and ctx.enabled and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


def bf16_supported(device: torch.device) -> bool:
    """The bf16 ``auto`` rule: a CUDA device that computes in bf16."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def autocast_context(cfg, device: torch.device):
    """bf16 autocast where the device supports it (``model.bf16_autocast``)."""
    mode = cfg.model.bf16_autocast
    on = mode == "on" or (mode == "auto" and bf16_supported(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def eval_dtype(dtype: str, device: torch.device | str):
    """``auto`` is bf16 on a GPU that supports it (the paper's training precision), else fp32; any
    spelling of ``stapo.config.dtypes`` (``bf16`` or ``bfloat16``, ...)."""
    try:
        dtype = canonical_dtype(dtype)
    except ValueError as err:
        raise ValueError(f"--dtype: {err}") from None
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported(torch.device(device)) else torch.float32
    return torch_dtype(dtype)


def refuse_cpu_float16(dtype: str, device: torch.device, model_source: str, key: str = "model.dtype") -> None:
    """float16 does not train on a CPU (no loss scaling: the first step goes non-finite and sampling
    breaks), so it is refused before the model loads; ``auto`` is the checkpoint's own dtype."""
    if device.type != "cpu":
        return
    dtype, origin = canonical_dtype(dtype), f"{key}={dtype}"
    if dtype == "auto":
        config = Path(model_source) / "config.json"
        saved = read_json(config) if config.is_file() else {}
        dtype = str(saved.get("dtype") or saved.get("torch_dtype") or "auto")
        origin = f"{key}=auto is the checkpoint's {dtype}, which"
    if dtype == "float16":
        raise UserError(f"{origin} does not train on a CPU (its first step overflows to inf/nan); "
                        f"use {key}=float32 or bfloat16 on a CPU, float16 on a GPU")


def read_json(path: Path, key: str = MODEL_KEY) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: {path} is not valid JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def check_model_folder(source: str, key: str = MODEL_KEY) -> None:
    """A local model folder holds a config.json and weights that are whole (safetensors headers
    against file sizes: a truncated download or copy is named before anything loads)."""
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_id(source):
            return  # a hub id, with the hub reachable
        raise UserError(f"{key}: {source}: no such folder")
    if not path.is_dir():
        raise UserError(f"{key}: {source} is a file, not a model folder (save_pretrained's)")
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: {source} is a folder but not a model: it has no config.json "
                        "(expected a save_pretrained folder or a hub id)")
    read_json(path / "config.json", key)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, key).get("weight_map", {}).values()))
    else:
        shards = ["model.safetensors"] if (path / "model.safetensors").is_file() else []
    if not shards and not any(path.glob("pytorch_model*.bin")):
        raise UserError(f"{key}: {source} has a config.json but no weights "
                        "(model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    for shard in shards:
        if problem := _safetensors_problem(path / shard):
            raise UserError(f"{key}: {path / shard}: {problem}; copy or download it again")


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


def load_tokenizer(source: str, key: str = MODEL_KEY, trust_remote_code: bool = False):
    """The tokenizer in ``source``, with a pad token: batches are padded, and eos stands in, as TRL does."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # not a local folder nor a reachable hub id; no tokenizer files
        raise UserError(f"{key}: cannot load a tokenizer from {source!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{key}: the tokenizer in {source!r} has neither a pad token nor an "
                            "eos token; set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: str, dtype="auto", key: str = MODEL_KEY, trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` from ``source`` in ``dtype`` (a torch dtype, or ``"auto"``: the checkpoint's)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: cannot load a causal LM from {source!r}: {err}") from None
