"""The generation interface every rollout backend implements (HF ``generate``, vLLM).

A backend turns tokenised prompts into sampled responses with the sampled tokens'
log-probabilities; ``stapo.rollout.collate`` turns those into a ``RolloutBatch``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (transformers 5 would otherwise apply its own default top-k)
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    n: int = 1  # samples per prompt
    seed: int | None = None


@dataclasses.dataclass
class Generation:
    response_ids: list[int]  # sampled tokens, cut after the first EOS (EOS included)
    logprobs: list[float] | None  # engine's log-prob of each sampled token at `temperature`; None if unknown
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    text: str = ""


@runtime_checkable
class Generator(Protocol):
    """What the trainer and the evaluators call. A backend that subclasses ``Generator`` inherits
    no-op ``sleep`` / ``wake_up`` / ``close``; only a backend with memory to free overrides them."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """``sampling.n`` generations for each prompt, in prompt order."""
        ...

    def update_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory while the trainer updates (colocated engines); no-op by default."""

    def wake_up(self) -> None:
        """Undo ``sleep`` before the next ``update_weights`` / ``generate``; no-op by default."""

    def close(self) -> None:
        """Release the backend's resources at the end of a run; no-op by default."""
