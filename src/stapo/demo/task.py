"""The demo's synthetic task: multi-step integer arithmetic with a checkable answer.

A problem is 2 or 3 operands in ``[1, max_operand]`` joined by ``+`` / ``-``, e.g.

    prompt   "Compute 37 + 48 - 19."
    solution "37 + 48 = 85. 85 - 19 = 66. \\boxed{66}"
    answer   "66"

Design choices:
- Negative results are *avoided*: a draw whose running total goes below zero at any
  step is rejected and redrawn. Answers are then plain digit strings, so ``-`` only
  ever means subtraction and the model needs no sign handling; the task stays a pure
  carry/borrow skill that a 0.5M-parameter model learns partly (the point of the demo:
  a mediocre warm start that RL can improve).
- Train, validation and held-out problems are disjoint by construction: each expression
  is hashed (SHA-256 of its canonical text); 1 in ``SPLIT_MODULUS`` goes to ``heldout``
  (evaluation), 1 in ``SPLIT_MODULUS`` to ``valid`` (the SFT's early-stopping check, so
  model selection never looks at the evaluation set), the rest to ``train``. The split
  depends on the expression only, never on the seed, so no seed can leak a held-out
  problem into training.
- ``make_problems(n, seed, split)`` is deterministic per ``(n, seed, split, difficulty)``
  and returns ``n`` distinct problems.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

from ..data.problem import Problem

SOURCE = "demo_arith"
SPLITS = ("train", "valid", "heldout")
SPLIT_MODULUS = 8  # 1/8 of the problem space is held out, 1/8 is validation
P_THREE_OPERANDS = 0.5  # mixture of 2- and 3-operand problems


def expression(operands: list[int], ops: list[str]) -> str:
    """Canonical text, e.g. ``"37 + 48 - 19"`` (``len(ops) == len(operands) - 1``)."""
    if len(ops) != len(operands) - 1:
        raise ValueError(
            f"ops: need {len(operands) - 1} operators for {len(operands)} operands, got {len(ops)}"
        )
    parts = [str(operands[0])]
    for op, x in zip(ops, operands[1:]):
        if op not in "+-" or len(op) != 1:
            raise ValueError(f"ops: unsupported operator {op!r}; use '+' or '-'")
        parts += [op, str(x)]
    return " ".join(parts)


def solution(operands: list[int], ops: list[str]) -> tuple[str, int]:
    """Step-by-step reference solution and its value: ``("37 + 48 = 85. 85 - 19 = 66. \\boxed{66}", 66)``."""
    expression(operands, ops)  # validates
    total, steps = operands[0], []
    for op, x in zip(ops, operands[1:]):
        new = total + x if op == "+" else total - x
        steps.append(f"{total} {op} {x} = {new}.")
        total = new
    return " ".join(steps) + f" \\boxed{{{total}}}", total


def split_of(expr: str) -> str:
    """``"heldout"`` / ``"valid"`` for 1 in ``SPLIT_MODULUS`` expressions each (by SHA-256), else ``"train"``."""
    h = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big") % SPLIT_MODULUS
    return "heldout" if h == 0 else "valid" if h == 1 else "train"


def _draw(rng: random.Random, max_operand: int) -> tuple[list[int], list[str]] | None:
    """One random problem, or None when a running total goes negative (rejected, see module doc)."""
    k = 3 if rng.random() < P_THREE_OPERANDS else 2
    operands = [rng.randint(1, max_operand) for _ in range(k)]
    ops = [rng.choice("+-") for _ in range(k - 1)]
    total = operands[0]
    for op, x in zip(ops, operands[1:]):
        total = total + x if op == "+" else total - x
        if total < 0:
            return None
    return operands, ops


def make_problems(
    n: int, seed: int, split: str = "train", *, max_operand: int = 99, distinct: bool = True
) -> list[Problem]:
    """``n`` problems of ``split`` ("train", "valid" or "heldout"), deterministic per seed.

    ``distinct=True`` (evaluation sets, RL prompts) never repeats an expression;
    ``distinct=False`` draws i.i.d. from the task distribution (the SFT stream: with
    ``max_operand=99`` there are only ~13k two-operand training expressions, so a long
    distinct stream would run out of them and drift towards three operands).

    Each is ``Problem(id="demo_arith/<expr>", prompt="Compute <expr>.", answer="<int>",
    source="demo_arith", meta={"solution": <reference solution>})``.
    """
    return draw_problems(
        n, seed, split, SOURCE, lambda operands, ops, _rng: solution(operands, ops),
        max_operand=max_operand, distinct=distinct,
    )


def draw_problems(
    n: int,
    seed: int,
    split: str,
    source: str,
    render: Callable[[list[int], list[str], random.Random], tuple[str, int]],
    *,
    max_operand: int = 99,
    distinct: bool = True,
) -> list[Problem]:
    """The problem stream shared by the demo tasks; ``render(operands, ops, rng)`` writes the solution."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if max_operand < 1:
        raise ValueError(f"max_operand: must be >= 1, got {max_operand}")
    # seed and split both enter the stream so the two splits are not filtered views of one sequence
    rng = random.Random(f"{source}/{split}/{seed}/{max_operand}")
    out: list[Problem] = []
    seen: set[str] = set()
    budget = 200 * n + 10_000  # rejections (negatives, other split, repeats) cost ~3x on average
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"n: cannot draw {n} distinct {split} problems with max_operand={max_operand}")
        drawn = _draw(rng, max_operand)
        if drawn is None:
            continue
        expr = expression(*drawn)
        if (distinct and expr in seen) or split_of(expr) != split:
            continue
        seen.add(expr)
        text, value = render(*drawn, rng)
        out.append(Problem(f"{source}/{expr}", f"Compute {expr}.", str(value), source, {"solution": text}))
    return out


_BOXED = re.compile(r"\\boxed\{\s*([^{}]*?)\s*\}")
_INT = re.compile(r"[+-]?\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (no nesting in this task), or None."""
    found = _BOXED.findall(text)
    return found[-1] if found else None


def exact_reward(text: str, answer: str) -> float:
    """1.0 if the last ``\\boxed{}`` in ``text`` holds exactly the integer ``answer``, else 0.0.

    Strict on purpose (no math-verify): the demo's answers are integers, and the box must
    contain an integer literal only ("66", "+66" and " 66 " pass; "66.0", "x=66" fail).
    """
    if not isinstance(answer, str) or not _INT.fullmatch(answer.strip()):
        raise ValueError(f"answer: expected an integer string, got {answer!r}")
    got = last_boxed(text)
    if got is None or not _INT.fullmatch(got):
        return 0.0
    return 1.0 if int(got) == int(answer) else 0.0
