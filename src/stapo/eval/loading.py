"""What ``stapo eval`` runs: a model and tokenizer from a hub id or a local save_pretrained folder,
through the one loader (``stapo.models.loading``), and the generator of the chosen rollout backend."""

from __future__ import annotations

from ..config.dtypes import canonical_dtype
from ..models.loading import eval_dtype, load_causal_lm, load_tokenizer, resolve_device


def dtype_name(dtype: str, device: str, backend: str = "hf") -> str:
    """The dtype an eval will run in, by torch's name (what ``eval_config.json`` records); a backend
    that loads the weights itself (vLLM) runs ``auto`` in the checkpoint's own."""
    from ..rollout.backends import get_backend

    if get_backend(backend).loads_weights:
        return canonical_dtype(dtype)
    return str(eval_dtype(dtype, resolve_device(device))).removeprefix("torch.")


def check_not_run_dir(path: str, flag: str = "--model") -> None:
    """A stapo training run folder is evaluated with ``--run``; say so instead of a tokenizer error."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir() and not (p / "config.json").exists():
        raise ValueError(f"{flag} {path}: is a stapo run folder, not a model; evaluate its checkpoints "
                         f"with `stapo eval --run {path}`")


def load_for_eval(path: str, settings, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer, generator) for ``stapo eval`` with ``settings.backend``; ``path`` is a local
    folder or a hub id already resolved (``models.hub.resolve_model_source``).

    The transformers model is loaded in eval mode on ``device``, unless the backend loads the weights
    itself (vLLM: model is None; the engine reads ``path``, in the checkpoint's dtype unless ``dtype``
    says otherwise).
    """
    from ..rollout.backends import eval_generator, get_backend

    tok = load_tokenizer(path, "--model")
    model = None
    if not get_backend(settings.backend).loads_weights:
        device = resolve_device(device)
        model = load_causal_lm(path, eval_dtype(dtype, device), "--model").to(device).eval()
    return model, tok, eval_generator(settings, model, tok, model_path=path, dtype=dtype)
