"""The ``math`` reward through the worker pool: real math-verify, hostile inputs, time bounds.

One pool (2 spawn workers, 2 s limit) serves the whole module: workers take ~2 s to start.
"""

import contextlib
import math
import time

import pytest

from stapo.rewards import OverlongConfig, RewardPool

W, LIMIT = 2, 2.0
SLACK = 0.5  # parent wake-up latency on a loaded 2-core machine


@pytest.fixture(scope="module")
def pool():
    with RewardPool("math", num_workers=W, timeout=LIMIT) as p:
        p.start()
        yield p


@contextlib.contextmanager
def settings(pool, **attrs):
    """Temporarily change parent-side settings (strict, format_weight, overlong) of the shared pool."""
    old = {k: getattr(pool, k) for k in attrs}
    for k, v in attrs.items():
        setattr(pool, k, v)
    try:
        yield pool
    finally:
        for k, v in old.items():
            setattr(pool, k, v)


CASES = [
    ("so \\boxed{27}", 27.0, 1.0),  # AMC's float gold
    ("so \\boxed{27}", "27.0", 1.0),
    ("\\boxed{\\dfrac12}", "0.5", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # symbolic equality
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),
    ("\\boxed{[0, 1]}", "[0,1)", 0.0),  # closed vs half-open
    ("\\boxed{28}", "27", 0.0),
    ("\\boxed{1} wait, no: \\boxed{2}", "1", 0.0),  # only the last box counts
    ("The final answer is $\\frac{3}{4}$.", "0.75", 1.0),  # no box: math-verify's fallback
    ("27", "27", 1.0),
    ("it is 27. \\boxed{}", "27", 0.0),  # an empty box never falls back
]


def test_math_reward(pool):
    scores = pool.score_batch([r for r, _, _ in CASES], [g for _, g, _ in CASES])
    assert scores == [e for _, _, e in CASES]


def test_gold_goes_first(pool):
    # math-verify is asymmetric: an inequality gold accepts the interval, an interval gold rejects
    # the inequality (set-relation comparison only when the prediction is the set)
    assert pool.verify_pairs([("0\\le x\\le 1", "[0,1]"), ("[0,1]", "0\\le x\\le 1")]) == [True, False]
    assert pool.score_batch(["\\boxed{[0,1]}", "\\boxed{0\\le x\\le 1}"], ["0\\le x\\le 1", "[0,1]"]) == [
        1.0,
        0.0,
    ]


def test_multi_part_gold_needs_every_part(pool):
    gold = ["1", "3"]
    responses = [
        "\\boxed{1, 3}",
        "\\boxed{3, 1}",  # any order
        "\\boxed{\\{1, 3\\}}",  # set notation
        "\\boxed{1} and \\boxed{3}",  # one box per part
        "\\boxed{1}",  # a part missing
        "\\boxed{1, 3, 5}",  # an extra part
        "\\boxed{1, 4}",  # a wrong part
    ]
    assert pool.score_batch(responses, [gold] * len(responses)) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    tuples = ["(1,2)", "(3,4)"]
    assert pool.score_batch(["\\boxed{(3,4), (1,2)}", "\\boxed{(1,2), (4,3)}"], [tuples, tuples]) == [
        1.0,
        0.0,
    ]


def test_strict_mode_requires_a_box(pool):
    responses = ["The answer is 27.", "... so \\boxed{27}"]
    assert pool.score_batch(responses, ["27", "27"]) == [1.0, 1.0]
    with settings(pool, strict=True):
        assert pool.score_batch(responses, ["27", "27"]) == [0.0, 1.0]


def test_format_and_overlong_terms(pool):
    responses = ["\\boxed{27}", "27", "\\boxed{26}"]
    with settings(pool, format_weight=0.5):
        assert pool.score_batch(responses, ["27"] * 3) == [1.0, 0.5, 0.0]  # 1 - 0.5 for no box
    with settings(pool, overlong=OverlongConfig(max_len=100, cache_len=20)):
        # L_max 100, L_cache 20: 90 tokens -> -0.5, 120 -> -1
        assert pool.score_batch(responses, ["27"] * 3, lengths=[50, 90, 120]) == [1.0, 0.5, -1.0]
        with pytest.raises(ValueError, match="lengths"):
            pool.score_batch(responses, ["27"] * 3)


def test_bad_arguments(pool):
    with pytest.raises(ValueError, match="golds has 1 entries for 2 responses"):
        pool.score_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
    with pytest.raises(ValueError, match="cannot import module"):
        RewardPool("no_such_module:fn")  # fails in the parent, before any worker starts


# Each entry must score 0.0 within its time limit; the gold is "7" and no entry is a 7.
HOSTILE = {
    "tower 9^9^9^9": "\\boxed{9^{9^{9^9}}}",
    "tower factorial": "\\boxed{10^{10^{10}}!}",
    "tower 2^2^2^2^2^2": "so \\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "200 kB boxed digits": "\\boxed{" + "9" * 200_000 + "}",
    "200 kB sum": "\\boxed{" + "1+" * 100_000 + "1}",
    "200 kB prose, no box": "la " * 70_000,
    "5,000 nested braces": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "5,000 unbalanced braces": "\\boxed{" + "{" * 5000 + "1",
    "unbalanced closers": "}" * 5000 + " \\boxed{1}}}}",
    "deep fraction (under the length cap)": "\\boxed{" + "\\frac{1}{" * 90 + "2" + "}" * 90 + "}",
    "null bytes": "\\boxed{1\x00\x00}\x00",
    "lone surrogates": "\\boxed{\ud800\udfff}",
    "invalid UTF-8 bytes": b"\\boxed{\xff\xfe\xfd}",
    "empty box": "the answer is 7 \\boxed{}",
}


def test_hostile_corpus_each_scores_zero_within_limit(pool):
    names = list(HOSTILE)
    t0 = time.perf_counter()
    scores = pool.score_batch([HOSTILE[n] for n in names], ["7"] * len(names))
    elapsed = time.perf_counter() - t0
    assert scores == [0.0] * len(names)
    for name, sec in zip(names, pool.last_item_seconds):
        assert sec <= LIMIT + SLACK, f"{name}: {sec:.2f}s"
    assert elapsed <= math.ceil(len(names) / W) * (LIMIT + SLACK)
    # the batch around them still works
    assert pool.score_batch(["\\boxed{7}"], ["7"]) == [1.0]


def test_hostile_batch_of_256_meets_the_bound(pool):
    """256 responses, 10 hostile: the batch finishes within the clean batch's time plus
    ceil(10 / W) x limit, far inside the pool's worst case ceil(256 / W) x limit."""

    def clean_batch(offset):  # 246 fresh answers (no cached parse), half right, a third fractions
        out = []
        for k in range(offset, offset + 246):
            gold = f"\\frac{{{k + 1}}}{{{k + 2}}}" if k % 3 == 0 else str(k)
            answer = gold if k % 2 == 0 else f"{k}.5"
            out.append((f"Step 1 ... Step {k % 7}. Hence \\boxed{{{answer}}}.", gold, float(k % 2 == 0)))
        return out

    hostile_names = [
        "tower 9^9^9^9", "tower factorial", "200 kB boxed digits", "200 kB prose, no box", "5,000 nested braces",
        "5,000 unbalanced braces", "null bytes", "lone surrogates", "invalid UTF-8 bytes", "empty box",
    ]  # fmt: skip
    clean = clean_batch(10_000)
    t0 = time.perf_counter()
    assert pool.score_batch([r for r, _, _ in clean], [g for _, g, _ in clean]) == [e for _, _, e in clean]
    t_clean = time.perf_counter() - t0

    mixed = clean_batch(20_000)
    for j, name in enumerate(hostile_names):  # spread through the batch
        mixed.insert(25 * j + 3, (HOSTILE[name], "7", 0.0))
    pool.pop_metrics()
    t0 = time.perf_counter()
    scores = pool.score_batch([r for r, _, _ in mixed], [g for _, g, _ in mixed])
    t_mixed = time.perf_counter() - t0
    metrics = pool.pop_metrics()
    print(f"\nclean 246: {t_clean:.2f}s; 246 + 10 hostile: {t_mixed:.2f}s; {metrics}")
    assert len(mixed) == 256 and scores == [e for _, _, e in mixed]
    assert t_mixed <= t_clean + math.ceil(10 / W) * LIMIT + 2 * SLACK
    assert t_mixed <= math.ceil(256 / W) * LIMIT
    # hostile items end in the worker's soft alarm (no restart) or, when the worker cannot answer
    # in time (C code, a starved CPU), in a hard kill: either way one restart at most per item
    assert metrics["reward/items"] == 256 and metrics["reward/worker_restarts"] <= 10


def test_pool_is_started_once_and_reused(pool):
    pids = [w.proc.pid for w in pool._workers]
    for k in range(3):
        assert pool.score_batch([f"\\boxed{{{k}}}"], [str(k)]) == [1.0]
    assert [w.proc.pid for w in pool._workers] == pids


def test_verify_pairs_and_metrics(pool):
    pool.pop_metrics()
    pairs = [("0.5", "\\frac{1}{2}"), ("3", "0.5"), ("7.0", "7"), ("1", None), (["1", "2"], "2, 1")]
    assert pool.verify_pairs(pairs) == [True, False, True, False, True]
    m = pool.pop_metrics()
    assert m["reward/items"] == 5 and m["reward/timeouts"] == 0
    assert pool.pop_metrics()["reward/items"] == 0  # popped
    assert pool.stats["reward/items"] >= 5  # cumulative
