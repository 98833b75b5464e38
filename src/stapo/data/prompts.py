"""Prompt templates: a problem's question -> the text the policy sees.

Two layers: an instruction template around the question (``boxed``, the STAPO paper's default;
``dapo``, DAPO-Math-17k's "Answer:" form; or a custom string with ``{question}``), then the
tokenizer's chat template when it has one, or a plain ``User: ... Assistant:`` frame otherwise.
"""

from __future__ import annotations

from typing import Any

from .problem import Problem

BOXED_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = {
    # STAPO (and Qwen2.5-Math, DeepScaleR) evaluation prompt
    "boxed": "{question}\n\n" + BOXED_SUFFIX,
    # DAPO-Math-17k's prompt, verbatim; its reward reads the "Answer:" line
    "dapo": (
        "Solve the following math problem step by step. The last line of your response should be of "
        "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "{question}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    ),
    "none": "{question}",
}
# for tokenizers without a chat template (base models, tiny test tokenizers)
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def apply_template(question: str, template: str = "boxed") -> str:
    """The question inside an instruction template: a name in ``TEMPLATES`` or a string with
    ``{question}`` (filled by replacement, not ``str.format``: LaTeX is full of braces)."""
    text = TEMPLATES.get(template, template)
    if "{question}" not in text:
        raise ValueError(
            f"template {template!r}: expected one of {sorted(TEMPLATES)} or a string with '{{question}}'"
        )
    return text.replace("{question}", question)


def strip_template(text: str) -> str:
    """Inverse of ``apply_template`` for the named templates: a verl parquet's user message back to
    the bare question (so stapo can apply its own template). Unknown text is returned as is."""
    for name, template in TEMPLATES.items():
        if name == "none":
            continue
        prefix, _, suffix = template.partition("{question}")
        if text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix):
            return text[len(prefix) : len(text) - len(suffix)]
    return text


def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    problem: Problem | str,
    tokenizer: Any = None,
    template: str = "boxed",
    use_chat_template: bool | str = "auto",
) -> str:
    """The full prompt string for ``problem``.

    ``use_chat_template``: "auto" uses the tokenizer's chat template when it has one, True requires
    it, False never uses it (plain frame ``PLAIN_TEMPLATE``).
    """
    question = problem.prompt if isinstance(problem, Problem) else problem
    text = apply_template(question, template)
    if use_chat_template not in ("auto", True, False):
        raise ValueError(f"use_chat_template={use_chat_template!r}: expected 'auto', True or False")
    chat = _has_chat_template(tokenizer)
    if use_chat_template is True and not chat:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    if chat and use_chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.replace("{prompt}", text)


# the config's data.use_chat_template / eval's chat_template setting -> build_prompt's argument
CHAT_MODES = {"auto": "auto", "on": True, "off": False}


def chat_mode(setting: str) -> bool | str:
    """``"auto" | "on" | "off"`` (the config's spelling) -> ``build_prompt``'s ``use_chat_template``."""
    try:
        return CHAT_MODES[setting]
    except KeyError:
        raise ValueError(f"chat template setting must be one of {', '.join(CHAT_MODES)}, got {setting!r}") from None


def render_prompts(problems: list, tokenizer: Any, cfg) -> list[str]:
    """The prompt text of each problem under a ``TrainConfig``'s ``data.template`` and ``data.use_chat_template``."""
    chat = chat_mode(cfg.data.use_chat_template)
    return [build_prompt(p, tokenizer, template=cfg.data.template, use_chat_template=chat) for p in problems]


def tokenize_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt: the one encoding of training, held-out and ``stapo eval``
    prompts, the teacher's privileged prompt and the demo's.

    A rendered chat template already carries its special tokens (BOS included), so none are added
    twice; a plain prompt gets the tokenizer's usual ones (a Llama-style base model's BOS), as
    the model saw in pre-training.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_prompt(problem: Problem | str, tokenizer: Any, template: str = "boxed",
                  use_chat_template: bool | str = "auto") -> tuple[str, list[int]]:
    """(``build_prompt``'s text, its ``tokenize_prompt`` ids) for one problem."""
    text = build_prompt(problem, tokenizer, template=template, use_chat_template=use_chat_template)
    return text, tokenize_prompt(tokenizer, text)
