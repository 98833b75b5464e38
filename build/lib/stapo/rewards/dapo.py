"""The ``dapo`` reward: the DAPO / JustRL rule-based verifier, string matching only, no SymPy.

Written from the published description (DAPO, arXiv 2503.14476, Sec. 2.4 and its verl recipe;
JustRL reuses it): read the end of the response, take the last ``Answer: ...`` line (the DAPO
prompt asks for one), else the last ``\\boxed{...}``; normalise it and the gold as strings (strip
LaTeX spacing, ``\\text{}`` wrappers, units, ``$``; keep the part after the last ``=``; canonical
numbers) and compare them for equality.

DAPO scores +1 / -1; here the reward is 1.0 / 0.0 like ``math``. The two differ by an affine map,
which group-normalised advantages (GRPO, DAPO) cancel; add the optional terms of ``terms.py`` on top.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .extract import last_boxed, split_top_level

# DAPO reads only the last 300 characters ("the longest answer in MATH-500 has 159 characters").
WINDOW = 300

_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]*\S)")
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = ("\\$", "\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "$")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|\\circ|\\%|%|\\\$")
_UNITS = re.compile(
    r"\b(?:degrees?|units?|cm|centimeters?|meters?|km|inches|inch|feet|foot|miles?|mph|"
    r"hours?|minutes?|seconds?|dollars?|cents?|pounds?|square|ways|points?|digits?|students?)\b"
)
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")  # \frac12 -> \frac{1}{2}
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+)")  # \sqrt2 -> \sqrt{2}
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def dapo_extract(response: str) -> str | None:
    """The last ``Answer:`` line of the response's tail, else its last boxed answer."""
    tail = response[-WINDOW:]
    lines = _ANSWER_LINE.findall(tail)
    if lines:
        return lines[-1]
    return last_boxed(tail)


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer: ``"x = \\$1,000.00"`` -> ``"1000"``."""
    s = answer.strip()
    if (boxed := last_boxed(s)) is not None:
        s = boxed
    s = s.split("=")[-1]
    for _ in range(3):  # nested wrappers: \text{\textbf{5}}
        s = _WRAPPERS.sub(r"\1", s)
    for token in _SPACING:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = _UNITS.sub("", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _NUMBER.match(s) and "." in s:
        s = s.rstrip("0").rstrip(".")  # 27.0 -> 27, 0.50 -> 0.5
    return s


def dapo_equal(gold: str | Sequence[str], pred: str | None) -> bool:
    """Normalised string equality; a list gold needs the same multiset of parts."""
    if pred is None:
        return False
    golds = [gold] if isinstance(gold, str) else [str(g) for g in gold]
    if len(golds) == 1:
        return normalize_answer(pred) == normalize_answer(golds[0]) != ""
    preds = sorted(normalize_answer(p) for p in split_top_level(pred.replace("$", "")))
    return preds == sorted(normalize_answer(g) for g in golds)


def dapo_reward(response: str, gold: str | Sequence[str], **_) -> float:
    """1.0 if the normalised final answer equals the normalised gold (every part of a list gold)."""
    return float(dapo_equal(gold, dapo_extract(response)))
