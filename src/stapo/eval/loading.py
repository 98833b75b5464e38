"""Load a model and tokenizer for evaluation from a hub id or a local save_pretrained directory."""

from __future__ import annotations

from ..config.dtypes import canonical_dtype, torch_dtype


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """``auto`` is bf16 on a GPU that supports it (the paper's training precision), else fp32; any
    spelling of ``stapo.config.dtypes`` (``bf16`` or ``bfloat16``, ...)."""
    import torch

    try:
        dtype = canonical_dtype(dtype)
    except ValueError as err:
        raise ValueError(f"--dtype: {err}") from None
    if dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return torch_dtype(dtype)


def dtype_name(dtype: str, device: str, backend: str = "hf") -> str:
    """The dtype an eval will run in, by torch's name (what ``eval_config.json`` records); vLLM's
    ``auto`` is the checkpoint's own."""
    if backend == "vllm":
        return canonical_dtype(dtype)
    return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")


def check_not_run_dir(path: str, flag: str = "--model") -> None:
    """A stapo training run folder is evaluated with ``--run``; say so instead of a tokenizer error."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / "config.json").exists():
        raise ValueError(f"{flag} {path}: is a stapo run folder, not a model; evaluate its checkpoints "
                         f"with `stapo eval --run {path}`")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model: cannot load a tokenizer from {path!r}: {err}") from err
    if tok.pad_token_id is None:  # batched generation pads; EOS is the usual stand-in (Llama, Qwen base)
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(path: str, dtype: str = "auto", device: str = "auto"):
    """(model in eval mode on ``device``, tokenizer with a pad token) for ``path``."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as err:
        raise ValueError(f"--model: cannot load a causal LM from {path!r}: {err}") from err
    return model.to(device).eval(), tok


def load_for_eval(
    path: str, backend: str = "hf", dtype: str = "auto", device: str = "auto", batch_size: int = 64
):
    """(model, tokenizer, generator) for ``stapo eval``.

    ``hf``: the transformers model on ``device`` and an ``HFGenerator``. ``vllm``: no transformers
    model at all (model is None); the engine loads the checkpoint itself from ``path``, in the
    checkpoint's dtype unless ``dtype`` says otherwise.
    """
    from ..models.hub import resolve_model_source
    from ..rollout import make_generator

    path = resolve_model_source(path, "--model")  # offline: the cached copy, or one line within seconds
    if backend == "vllm":
        tok = load_tokenizer(path)
        vllm_dtype = canonical_dtype(dtype)  # vLLM takes torch's names
        # eval has the GPU to itself (no trainer beside the engine), so give vLLM most of it
        gen = make_generator(
            "vllm", None, tok, model_path=path, dtype=vllm_dtype, gpu_memory_utilization=0.85
        )
        return None, tok, gen
    model, tok = load_model_and_tokenizer(path, dtype=dtype, device=device)
    return model, tok, make_generator(backend, model, tok, batch_size=batch_size)
