"""Privileged self-teacher for the self-distillation objectives (``dasd``, ``opsd``, ``dasd_reverse``).

``context``: the teacher's prompt = the problem plus privileged information from the record.
``teacher``: the teacher pass, the current policy scoring the student's sampled tokens in that
context without gradient (``RolloutBatch.teacher_logprobs``).
"""

from .context import (
    ANSWER_TEMPLATE,
    HINT_TEMPLATES,
    apply_hint,
    check_templates,
    privileged_hint,
    teacher_prompt,
)
from .teacher import compute_teacher_logprobs, teacher_batch, teacher_prompt_ids

__all__ = [
    "ANSWER_TEMPLATE",
    "HINT_TEMPLATES",
    "apply_hint",
    "check_templates",
    "compute_teacher_logprobs",
    "privileged_hint",
    "teacher_batch",
    "teacher_prompt",
    "teacher_prompt_ids",
]
