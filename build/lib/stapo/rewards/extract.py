"""Final-answer extraction from model responses: pure string code, linear time, no SymPy.

Everything here runs in the caller's process (the trainer, the evaluator), so it must never hang:
no SymPy, no regex that can backtrack over the whole response. The SymPy work happens in the
reward workers (``stapo.rewards.pool``), which have hard time limits.

Order of extraction (``extract_answer``):
  1. the last ``\\boxed{...}`` (or ``\\fbox{...}``), brace-balanced; an empty or unbalanced last box is
     "no answer" and does not fall back (a model that boxes nothing has committed to nothing);
  2. unless ``strict``: math-verify's own answer patterns, in its priority order ("final answer is",
     "answer:", the last LaTeX environment, the last number or expression), read as strings.
"""

from __future__ import annotations

import re

# The fallback reads only the end of a response, where the answer is (DAPO reads 300 characters).
# The bound matters: math-verify's expression pattern backtracks quadratically on runs like
# "1+1+...+1a" (C-level regex, no signal can stop it): ~0.3 s at 2 kB, ~1.1 s at 4 kB.
FALLBACK_WINDOW = 2000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BRACE_RE = re.compile(r"[\\{}]")


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every balanced ``\\boxed{...}`` in ``text``, in order.

    ``\\boxed 5`` (no braces, as some models write) spans to the next whitespace or ``$``.
    A backslash escapes the next character, so ``\\boxed{\\}}`` is the content ``\\}``.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        if i < len(text) and text[i] == " " and not text[i:].lstrip(" ").startswith("{"):
            j = i + 1
            while j < len(text) and not text[j].isspace() and text[j] != "$":
                j += 1
            spans.append((i + 1, j))
            pos = j
            continue
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            pos = m.end()
            continue
        end = _match_brace(text, i)
        if end is None:  # unbalanced: nothing after it can close a box either
            spans.append((i + 1, -1))
            break
        spans.append((i + 1, end))
        pos = end + 1
    return spans


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``open_at``, or None. Linear (one regex scan)."""
    depth = 0
    skip_until = -1
    for m in _BRACE_RE.finditer(text, open_at):
        k = m.start()
        if k < skip_until:
            continue
        ch = m.group()
        if ch == "\\":
            skip_until = k + 2  # "\{" and "\}" are literal braces, "\\" a line break
        elif ch == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return k
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``; None if there is none or the last one never closes."""
    spans = boxed_spans(text)
    if not spans or spans[-1][1] < 0:
        return None
    start, end = spans[-1]
    return text[start:end]


def all_boxed(text: str) -> list[str]:
    """Contents of every balanced ``\\boxed{...}``, in order."""
    return [text[s:e] for s, e in boxed_spans(text) if e >= 0]


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The response's final answer as a string, or None.

    The last ``\\boxed{...}`` wins. With ``strict=False`` a response without any ``\\boxed`` falls
    back to math-verify's answer patterns; with ``strict=True`` it has no answer, so a model is
    never rewarded for mentioning the number somewhere in its reasoning.
    """
    if _BOX_RE.search(text) is not None:
        ans = last_boxed(text)
        return (ans.strip() or None) if ans is not None else None
    if strict:
        return None
    return _math_verify_fallback(text[-FALLBACK_WINDOW:])


def _math_verify_fallback(text: str) -> str | None:
    """math-verify's extraction order (``parse``'s default LaTeX + expression targets), strings only.

    Same patterns and priorities as ``math_verify.parser.extract_target_from_pred``: the lowest
    priority number wins, and within it the rightmost match. Unlike math-verify we do not parse the
    match with SymPy here (the worker does), so a match that would not parse is still returned.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    from math_verify.parser import get_extraction_regexes

    patterns = [
        (pattern, priority)
        for regexes, _ in get_extraction_regexes([LatexExtractionConfig(), ExprExtractionConfig()])
        for pattern, priority in regexes
    ]
    for priority in sorted({p for _, p in patterns}):
        matches = [m for pattern, p in patterns if p == priority for m in pattern.finditer(text)]
        for m in sorted(matches, key=lambda m: (m.end(), -m.start()), reverse=True):
            if (ans := _match_string(m)) is not None:
                return ans
    return None


def _match_string(m: re.Match) -> str | None:
    groups = {k: v for k, v in m.groupdict().items() if v}
    latex = [v for k, v in groups.items() if "_latex" in k]  # first_latex*, next1_latex*, ...
    if latex:
        return ", ".join(s.strip() for s in latex)
    if "expr" in groups:
        return groups["expr"].strip()
    integer = next((v for k, v in groups.items() if k.startswith("integer")), "")
    decimal = next((v for k, v in groups.items() if k.startswith("decimal")), "")
    number = integer.replace(",", "").replace(" ", "") + decimal.replace(",", ".")
    return number or None


_OPEN, _CLOSE = "([{", ")]}"


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside any bracket: ``"(1,2), [0,1)"`` -> ``["(1,2)", "[0,1)"]``.

    Brackets are counted by kind-agnostic depth, so half-open intervals ``[0,1)`` balance.
    Escaped braces ``\\{ \\}`` count as brackets (set notation keeps its commas).
    """
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
        elif ch == sep and depth == 0:
            parts.append(text[start:k].strip())
            start = k + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


_SET_RE = re.compile(r"^\\\{(.*)\\\}$", re.DOTALL)
_DOLLAR_RE = re.compile(r"(?<!\\)\$")  # math delimiters, not the escaped currency sign \$


def answer_parts(answer: str, k: int) -> list[str]:
    """The ``k`` parts of a multi-part answer: ``"1, 3"``, ``"\\{1, 3\\}"`` or ``"$1$, $3$"``."""
    answer = strip_dollars(answer)
    if k > 1 and (m := _SET_RE.match(answer)):
        answer = m.group(1)
    return [strip_dollars(p) for p in split_top_level(answer)]


def strip_dollars(text: str) -> str:
    """``"$x$"`` -> ``"x"``; inner ``$`` (as in ``"$1$,$2$"``) go too, ``\\$`` (currency) stays."""
    return _DOLLAR_RE.sub("", text).strip()


def has_box(text: str) -> bool:
    """Does ``text`` contain a ``\\boxed`` / ``\\fbox`` (balanced or not)?"""
    return _BOX_RE.search(text) is not None
