"""Optional reward terms, off by default, added to either reward (``math``, ``dapo`` or a user's).

    total = correctness + format_weight * format_term + overlong.factor * overlong_penalty

- ``format_term``: 0 when the response ends with an answer in the expected form (a ``\\boxed{}``;
  for ``dapo`` also an ``Answer:`` line), -1 otherwise. A penalty, not a bonus, so that 1.0 still
  means "correct and well-formed".
- ``overlong_penalty``: DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13).
"""

from __future__ import annotations

import dataclasses

from .dapo import dapo_extract
from .extract import last_boxed


@dataclasses.dataclass(frozen=True)
class OverlongConfig:
    """DAPO soft overlong punishment: ``max_len`` = L_max, ``cache_len`` = L_cache (tokens)."""

    max_len: int
    cache_len: int
    factor: float = 1.0  # verl's overlong_penalty_factor

    def __post_init__(self):
        if not 0 < self.cache_len <= self.max_len:
            raise ValueError(
                f"overlong: need 0 < cache_len <= max_len, got cache_len={self.cache_len}, "
                f"max_len={self.max_len}"
            )


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO Eq. 13: 0 up to L_max - L_cache, then linear down to -1 at L_max, -1 beyond.

    R(y) = 0                                   if |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
         = -1                                  if |y| > L_max
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    free = max_len - cache_len
    if length <= free:
        return 0.0
    if length > max_len:
        return -1.0
    return (free - length) / cache_len


def as_overlong(overlong) -> OverlongConfig | None:
    """``None``, an ``OverlongConfig``, a ``(max_len, cache_len[, factor])`` tuple or a dict."""
    if overlong is None or isinstance(overlong, OverlongConfig):
        return overlong
    if isinstance(overlong, dict):
        return OverlongConfig(**overlong)
    return OverlongConfig(*overlong)


def format_term(response: str, reward: str = "math") -> float:
    """0.0 if the response carries a final answer in the expected form, else -1.0."""
    if reward == "dapo":
        ok = dapo_extract(response) is not None
    else:
        ok = bool((last_boxed(response) or "").strip())
    return 0.0 if ok else -1.0
