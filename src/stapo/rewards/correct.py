"""When a sample is correct: the one definition behind held-out accuracy in training and ``stapo eval``."""

from __future__ import annotations

FULL_SCORE = 1.0  # the built-in verifiers score 1.0 (right) or 0.0


def is_correct(score: float) -> bool:
    """The verifier's unshaped score is full marks: partial credit from a user's reward is not correct."""
    return bool(score >= FULL_SCORE)
