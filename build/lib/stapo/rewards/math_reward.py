"""The ``math`` reward: 1.0 iff the response's final answer is mathematically equal to the gold.

Equality is math-verify's (SymPy): ``verify(gold, prediction)``, gold first, because verify is not
symmetric (assignments such as ``x = 3`` are simplified on the prediction side only, see its
docstring). Both sides go through the same path, ``parse("\\boxed{" + answer + "}")``, as verl's
``math_verify`` reward does for its ground truth.

This module runs inside reward workers (``stapo.rewards.pool``). It calls math-verify with its own
SIGALRM timeouts switched off (they fail outside the main thread, and they would cancel the
worker's own timer); the worker's soft timer and the pool's hard kill bound the time instead.

A multi-part gold (``list[str]``, e.g. an OlympiadBench item with several answers) needs every
part right: the prediction must have exactly as many parts (``"1, 3"``, ``"\\{1, 3\\}"`` or one
``\\boxed{}`` per part) and each gold part must be equal to a distinct predicted part.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .extract import all_boxed, answer_parts, extract_answer, strip_dollars

# An extracted answer longer than this scores 0.0 without SymPy: no gold answer in our data is
# over ~250 characters, and a 200 kB "answer" would only burn the item's time limit.
MAX_ANSWER_CHARS = 1000


def gold_parts(gold: str | Sequence[str]) -> list[str]:
    """A gold answer as its list of parts (one part for a plain string)."""
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


@functools.lru_cache(maxsize=16384)
def parse_answer(answer: str) -> tuple:
    """math-verify's parse of one answer string: a tuple of SymPy expression and/or string fallback,
    empty if nothing could be extracted. Cached per worker: a gold is parsed once per worker, not
    once per sample of its group (the pool routes a gold's items to the worker that parsed it).

    Parses are deliberately not pickled between processes: unpickling rebuilds SymPy objects
    through their evaluating constructors, so ``9^{9^{9^9}}`` would hang the receiver in C code.
    """
    from math_verify import parse

    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=None))


def _equal(gold: str, pred: str) -> bool:
    from math_verify import verify

    g, p = parse_answer(strip_dollars(gold)), parse_answer(strip_dollars(pred))
    return bool(g) and bool(p) and verify(list(g), list(p), timeout_seconds=None)


def parse_keys(gold: str | Sequence[str], pred: str | None) -> list[str]:
    """The strings ``answers_equal(gold, pred)`` may parse (the pool routes by them): the whole
    gold, the whole prediction, then the parts of a multi-part gold and prediction."""
    golds = gold_parts(gold)
    keys, parts = [", ".join(golds)], golds if len(golds) > 1 else []
    if pred is not None:
        preds = answer_parts(pred, len(golds)) if len(golds) > 1 else [pred]
        keys.append(", ".join(preds))
        parts = parts + (preds if len(preds) > 1 else [])
    return [strip_dollars(k) for k in keys + parts]


def answers_equal(gold: str | Sequence[str], pred: str | None) -> bool:
    """Is the answer string ``pred`` equal to ``gold`` (a string, or parts that must all match)?"""
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    golds = gold_parts(gold)
    if len(golds) == 1:
        return _equal(golds[0], pred)
    preds = answer_parts(pred, len(golds))
    if len(preds) != len(golds):
        return False
    # fast path: both lists as one answer, one parse each (math-verify compares sets element-wise)
    if _equal(", ".join(golds), ", ".join(preds)):
        return True
    unused = list(range(len(preds)))
    for i, g in enumerate(golds):
        # same position first (answers are usually listed in the gold's order), then any other
        order = ([i] if i in unused else []) + [j for j in unused if j != i]
        hit = next((j for j in order if _equal(g, preds[j])), None)
        if hit is None:
            return False
        unused.remove(hit)
    return True


def final_answer(response: str, n_parts: int = 1, strict: bool = False) -> str | None:
    """``extract_answer``, except that a k-part gold also accepts the last k ``\\boxed{}`` answers."""
    ans = extract_answer(response, strict=strict)
    if n_parts > 1 and ans is not None and len(answer_parts(ans, n_parts)) == 1:
        boxes = all_boxed(response)
        if len(boxes) >= n_parts:
            ans = ", ".join(b.strip() for b in boxes[-n_parts:])
    return ans


def math_reward(response: str, gold: str | Sequence[str], *, strict: bool = False, **_) -> float:
    """1.0 if the final answer of ``response`` is equal to ``gold``, else 0.0."""
    pred = final_answer(response, len(gold_parts(gold)), strict=strict)
    return 1.0 if answers_equal(gold, pred) else 0.0
