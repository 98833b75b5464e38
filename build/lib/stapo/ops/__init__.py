"""Memory-efficient per-token statistics of a causal LM's head (issue 11).

``token_stats`` works on final hidden states and the head weight; ``model_token_stats``
runs a Hugging Face causal LM (plain, PEFT-wrapped, under autocast) and returns the
statistics of its response tokens. ``naive_token_stats`` / ``stats_from_logits`` are the
full-logits reference and fallback.
"""

from .chunked_stats import (
    DEFAULT_CHUNK_SIZE,
    TokenStatsOut,
    naive_token_stats,
    stats_from_logits,
    token_stats,
)
from .model_stats import fast_path_blocker, generation_position_ids, model_token_stats

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "TokenStatsOut",
    "fast_path_blocker",
    "generation_position_ids",
    "model_token_stats",
    "naive_token_stats",
    "stats_from_logits",
    "token_stats",
]
