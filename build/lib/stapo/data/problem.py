"""The one record type for training and evaluation problems."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str  # unique within its source, e.g. "math500/17"
    prompt: str  # the question text (no template applied yet)
    answer: str | list[str]  # gold answer(s); a list means every part must be right (OlympiadBench)
    source: str  # data_source / benchmark name
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"solution": ...}

    @property
    def answer_parts(self) -> list[str]:
        """The gold answer as its list of parts: ``[answer]`` for a plain string."""
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)
