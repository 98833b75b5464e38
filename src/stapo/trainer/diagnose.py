"""Token-level diagnostics inside the training step (whatever the objective)."""

from __future__ import annotations

import torch


class StepDiagnostics:
    """Collects each mini-batch's detached statistics and turns them into ``diag/*`` metrics."""

    def __init__(self, cfg, vocab_size: int):
        self.cfg = cfg
        self.enabled = cfg.diagnostics.enabled
        self.vocab_size = vocab_size
        self._parts = []

    def observe(self, micros, stats, overrides) -> None:
        if not self.enabled:
            return
        self._parts.append((micros, stats, overrides))

    def result(self) -> dict[str, float]:
        parts, self._parts = self._parts, []
        return {}

    def dump(self, path, batch, tokenizer, step) -> None:
        return None
