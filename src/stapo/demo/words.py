"""The ``demo_words`` task: the demo's arithmetic, with solutions in free wording.

Same problems, splits and answers as ``stapo.demo.task`` (``"Compute 37 + 48 - 19."`` → ``"66"``),
but each reference solution words every step in one of several phrasings, e.g.

    "First, we add 48 to 37 to get 85. Next, 85 minus 19 is 66. So the answer is \\boxed{66}."

Why (STAPO's regime, issue 16): spurious tokens are low-probability tokens sampled in confident
contexts *inside correct responses*. In bare arithmetic every token carries the answer, so an odd
token derails the response and its advantage is negative. Wording gives tokens that "contribute
little to the reasoning outcome"; with a realistic vocabulary tail (the BPE is trained on MATH
problem texts shipped in ``stapo/demo/data``) and a warm start that reads past junk tokens
(``stapo.demo.sft.insert_junk``), a correct response can carry one, as in a large model.

The phrasing is drawn from a per-problem RNG, so ``make_problems`` stays deterministic per
``(n, seed, split)`` and, like the arithmetic task, the i.i.d. SFT stream sees every phrasing.
"""

from __future__ import annotations

import gzip
import json
import random
from importlib import resources

from ..data.problem import Problem
from .task import draw_problems, expression

SOURCE = "demo_words"
MATH_TEXTS = "math_problems.json.gz"  # package data: MATH training problem statements (MIT, LICENSE.rllm)

OPENERS = ("First, ", "To start, ", "")  # before the first step
CONNECTORS = ("Then ", "Next, ", "Now ", "After that, ")  # before each later step
ADD = (
    "we add {x} to {a} to get {n}.",
    "{a} plus {x} is {n}.",
    "adding {x} to {a} gives {n}.",
    "we have {a} + {x} = {n}.",
    "{a} + {x} makes {n}.",
)
SUBTRACT = (
    "we subtract {x} from {a} to get {n}.",
    "{a} minus {x} is {n}.",
    "taking {x} away from {a} leaves {n}.",
    "we have {a} - {x} = {n}.",
    "{a} - {x} makes {n}.",
)
CLOSERS = (
    "So the answer is \\boxed{{{n}}}.",
    "The final answer is \\boxed{{{n}}}.",
    "Therefore, the result is \\boxed{{{n}}}.",
)


def worded_solution(operands: list[int], ops: list[str], rng: random.Random) -> tuple[str, int]:
    """A worded step-by-step solution and its value; the phrasing of each step is drawn from ``rng``."""
    expression(operands, ops)  # validates
    total, sentences = operands[0], []
    for i, (op, x) in enumerate(zip(ops, operands[1:])):
        new = total + x if op == "+" else total - x
        step = rng.choice(ADD if op == "+" else SUBTRACT).format(a=total, x=x, n=new)
        lead = rng.choice(OPENERS if i == 0 else CONNECTORS)
        sentences.append(lead + step if lead else step[0].upper() + step[1:])
        total = new
    sentences.append(rng.choice(CLOSERS).format(n=total))
    return " ".join(sentences), total


def make_problems(
    n: int, seed: int, split: str = "train", *, max_operand: int = 99, distinct: bool = True
) -> list[Problem]:
    """``n`` problems of ``split``, as ``stapo.demo.task.make_problems`` but with worded solutions.

    Each is ``Problem(id="demo_words/<expr>", prompt="Compute <expr>.", answer="<int>",
    source="demo_words", meta={"solution": <worded solution>})``.
    """
    return draw_problems(n, seed, split, SOURCE, worded_solution, max_operand=max_operand, distinct=distinct)


def math_texts(limit: int | None = None) -> list[str]:
    """MATH training problem statements shipped with the package (the tokenizer's natural-language tail)."""
    blob = resources.files("stapo.demo").joinpath("data", MATH_TEXTS).read_bytes()
    texts = json.loads(gzip.decompress(blob).decode("utf-8"))
    return texts[:limit] if limit is not None else texts
