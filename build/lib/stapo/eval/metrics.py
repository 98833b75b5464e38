"""Evaluation metrics over N samples per problem: avg@N, pass@k, maj@k and the standard error.

Notation: a benchmark has P problems; problem i has n samples, c_i of them correct.

- avg@N   = mean_i c_i / n: the mean pass@1 over the samples (the paper's headline metric).
- pass@k  = mean_i [1 − C(n−c_i, k) / C(n, k)]: the unbiased estimator of Chen et al. 2021
            (Codex, arXiv 2107.03374 eq. 1), the probability that at least one of k samples
            drawn without replacement from the n is correct.
- maj@k   = mean_i [the majority answer among the problem's first k samples is correct], answers
            grouped into equivalence classes by the verifier, not by string equality.
- stderr  = std_i(c_i / n) / sqrt(P): the standard error of avg@N across problems.

All functions are pure and work on plain Python numbers; no model or verifier is called here
(the verifier enters ``majority_vote`` as a precomputed equivalence relation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 − C(n−c, k) / C(n, k).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), the product form of the binomial ratio
    (Codex, arXiv 2107.03374, Fig. 3), which never forms the huge binomials and so is
    stable for any n.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def k_ladder(n: int) -> list[int]:
    """The k at which pass@k and maj@k are reported: 1, 2, 4, ... up to n, and n itself."""
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[int, int], bool],
) -> bool:
    """Is the majority answer of these samples correct?

    ``answers[j]`` is sample j's extracted answer (None when nothing was extracted: it casts no
    vote); ``correct[j]`` its verified correctness; ``equivalent(a, b)`` says whether samples
    a < b gave the same answer. Classes are built greedily in sample order: each sample joins the
    first class whose representative (its earliest member) it is equivalent to. The largest class
    wins and ties go to the class that appeared first, the usual deterministic tie-break. The
    winner is correct when its representative is. No answer at all counts as wrong.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    reps: list[int] = []  # representative sample of each class, in order of first appearance
    sizes: list[int] = []
    for j, ans in enumerate(answers):
        if ans is None:
            continue
        for c, rep in enumerate(reps):
            if equivalent(rep, j):
                sizes[c] += 1
                break
        else:
            reps.append(j)
            sizes.append(1)
    if not reps:
        return False
    best = max(range(len(reps)), key=lambda c: (sizes[c], -c))  # largest, then earliest
    return bool(correct[reps[best]])


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, std (ddof=1) / sqrt(len); the error is 0 for one value."""
    if not values:
        raise ValueError("mean_and_stderr of no values")
    m = len(values)
    mean = sum(values) / m
    if m == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (m - 1)
    return mean, math.sqrt(var / m)


def benchmark_metrics(
    correct: Sequence[Sequence[bool]],
    maj_votes: dict[int, Sequence[bool]] | None = None,
) -> dict:
    """Aggregate one benchmark.

    ``correct[i][j]``: sample j of problem i is correct (every problem has the same n samples).
    ``maj_votes[k][i]``: problem i's majority answer over its first k samples is correct.
    Returns ``{"n_samples", "n_problems", "avg", "avg_stderr", "pass_at_k": {k: v}, "maj_at_k": {k: v}}``;
    the keys of the k-dicts are strings so the dict round-trips through JSON unchanged.
    """
    if not correct:
        raise ValueError("benchmark_metrics needs at least one problem")
    n = len(correct[0])
    if any(len(row) != n for row in correct):
        raise ValueError("every problem must have the same number of samples")
    counts = [sum(bool(x) for x in row) for row in correct]
    avg, stderr = mean_and_stderr([c / n for c in counts])
    out = {
        "n_samples": n,
        "n_problems": len(correct),
        "avg": avg,
        "avg_stderr": stderr,
        "pass_at_k": {str(k): sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in k_ladder(n)},
    }
    if maj_votes is not None:
        out["maj_at_k"] = {str(k): sum(map(bool, v)) / len(v) for k, v in sorted(maj_votes.items())}
    return out


def macro_average(per_benchmark: dict[str, dict]) -> dict:
    """The unweighted mean of avg@N over benchmarks (the paper's "Avg." column), with its error.

    The benchmarks are independent samples, so the standard error of the mean of B of them is
    sqrt(Σ se_b²) / B.
    """
    if not per_benchmark:
        raise ValueError("macro_average of no benchmarks")
    b = len(per_benchmark)
    avg = sum(m["avg"] for m in per_benchmark.values()) / b
    se = math.sqrt(sum(m["avg_stderr"] ** 2 for m in per_benchmark.values())) / b
    return {"avg": avg, "avg_stderr": se, "benchmarks": list(per_benchmark)}
