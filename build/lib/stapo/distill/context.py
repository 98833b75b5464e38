"""The privileged teacher context: the problem plus information the student never sees.

    hint   = problem.meta["solution"]                      when the record has a reference solution
           = answer_template with the gold answer          otherwise ("The final answer is 66.")
    user   = hint_template with {question} and {hint}      (a name in HINT_TEMPLATES or a string)
    prompt = build_prompt(user, tokenizer, template, ...)  the student's instruction and chat templates

The teacher prompt reuses the student's instruction template and chat template (``build_prompt``), so
the two contexts differ only by the privileged information (on-policy self-distillation, Zhao et al.
2026, arXiv 2601.18734; DASD, arXiv 2605.22263). Placeholders are filled by one regex pass, never
``str.format``: LaTeX solutions are full of braces.
"""

from __future__ import annotations

import re
from typing import Any

from ..data.problem import Problem
from ..data.prompts import build_prompt

ANSWER_TEMPLATE = "The final answer is {answer}."  # issue 10's fallback hint
HINT_TEMPLATES = {
    # stapo's wording of the OPSD-style privileged prompt (the DASD paper's exact text is not public)
    "reference": (
        "{question}\n\nHere is a reference solution to this problem:\n{hint}\n\n"
        "Using it as a guide, solve the problem step by step in your own words."
    ),
    # for the demo's tiny tokenizer, whose vocabulary only spells the demo's own words
    # ("Question", "Answer", "Compute"): the reference answer as a solved turn before the question
    "demo": "{question}\nAnswer: {hint}\nQuestion: {question}",
}
_PLACEHOLDER = re.compile(r"\{(question|hint)\}")


def privileged_hint(problem: Problem, answer_template: str = ANSWER_TEMPLATE) -> str:
    """The privileged text for ``problem``: its reference solution, else the final-answer sentence."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem: expected a stapo.data.Problem (with meta and answer), got {type(problem).__name__}")
    solution = problem.meta.get("solution") if isinstance(problem.meta, dict) else None
    if isinstance(solution, str) and solution.strip():
        return solution
    if "{answer}" not in answer_template:
        raise ValueError(f"distill.answer_template must contain '{{answer}}', got {answer_template!r}")
    return answer_template.replace("{answer}", ", ".join(problem.answer_parts))


def apply_hint(question: str, hint: str, hint_template: str = "reference") -> str:
    """``hint_template`` (a name in ``HINT_TEMPLATES`` or a string) with {question} and {hint} filled in."""
    text = HINT_TEMPLATES.get(hint_template, hint_template)
    found = set(_PLACEHOLDER.findall(text))
    if found != {"question", "hint"}:
        raise ValueError(
            f"distill.hint_template {hint_template!r}: expected one of {sorted(HINT_TEMPLATES)} or a string "
            "with both '{question}' and '{hint}'"
        )
    values = {"question": question, "hint": hint}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)  # one pass: a hint may contain "{question}"


def check_templates(hint_template: str, answer_template: str) -> None:
    """Raise a ValueError naming the ``distill.*`` key when a template cannot render (config time)."""
    apply_hint("q", "h", hint_template)
    if "{answer}" not in answer_template:
        raise ValueError(f"distill.answer_template must contain '{{answer}}', got {answer_template!r}")


def teacher_prompt(
    problem: Problem,
    tokenizer: Any = None,
    template: str = "boxed",
    hint_template: str = "reference",
    answer_template: str = ANSWER_TEMPLATE,
    use_chat_template: bool | str = "auto",
) -> str:
    """The teacher's full prompt string for ``problem`` (see the module docstring).

    ``template`` and ``use_chat_template`` are the student's (``data.template``,
    ``data.use_chat_template``), so ``teacher_prompt`` differs from ``build_prompt`` only by the hint.
    """
    hint = privileged_hint(problem, answer_template)  # checks that `problem` is a record first
    question = apply_hint(problem.prompt, hint, hint_template)
    return build_prompt(question, tokenizer, template=template, use_chat_template=use_chat_template)
