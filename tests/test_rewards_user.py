"""Users' reward functions in the pool, and workers that hang or die: hard kill, replace, score 0.0.

The functions live in tests/fixtures/user_rewards.py (tests/ is on sys.path via conftest.py, and
spawned workers inherit sys.path). HANG swallows the worker's soft alarm and CSPIN spins in C, so
only the pool's wall-clock kill stops them.
"""

import time

import pytest

from stapo.rewards import RewardPool
from stapo.rewards.registry import reward_spec

LIMIT, SLACK = 1.0, 0.5


@pytest.fixture(scope="module")
def verl_pool():
    with RewardPool("fixtures.user_rewards:verl_reward", num_workers=2, timeout=LIMIT) as p:
        p.start()
        yield p


def test_verl_function_gets_its_columns(verl_pool):
    scores = verl_pool.score_batch(
        ["so 12", "so 13", "so 12"],
        ["12", "12", "12"],
        data_sources=["a", "b", "c"],
        extra_infos=[{}, {}, {"bonus": 0.25}],
    )
    assert scores == [1.0, 0.0, 1.25]


def test_hung_and_crashing_workers_are_killed_and_replaced(verl_pool):
    responses = [f"answer {k}" for k in range(40)]
    bad = {5: "HANG", 17: "CSPIN", 26: "CRASH", 33: "HANG"}
    for i, marker in bad.items():
        responses[i] = f"{marker} answer {i}"
    pids = {w.proc.pid for w in verl_pool._workers}
    verl_pool.pop_metrics()
    t0 = time.perf_counter()
    scores = verl_pool.score_batch(responses, [str(k) for k in range(40)])
    elapsed = time.perf_counter() - t0
    m = verl_pool.pop_metrics()
    assert scores == [0.0 if i in bad else 1.0 for i in range(40)]
    for i, marker in bad.items():
        status, sec = verl_pool.last_item_status[i], verl_pool.last_item_seconds[i]
        assert status == ("error" if marker == "CRASH" else "timeout"), (marker, status)
        assert sec <= LIMIT + SLACK, (marker, sec)
    assert m["reward/timeouts"] == 3 and m["reward/errors"] == 1 and m["reward/worker_restarts"] == 4
    assert not pids & {w.proc.pid for w in verl_pool._workers}  # both original workers were replaced
    print(f"\n40 items, 3 hard kills + 1 crash on 2 workers: {elapsed:.2f}s")
    # the replacements serve the next batch
    assert verl_pool.score_batch(["so 7"], ["7"]) == [1.0]


def test_memory_bomb_fails_fast_without_a_restart(verl_pool):
    verl_pool.pop_metrics()
    assert verl_pool.score_batch(["MEMBOMB 1", "so 2"], ["1", "2"]) == [0.0, 1.0]
    assert verl_pool.last_item_status[0] == "error" and verl_pool.last_item_seconds[0] < LIMIT
    assert verl_pool.pop_metrics()["reward/worker_restarts"] == 0  # a MemoryError, not a kill


def test_function_reward_spec():
    from fixtures import user_rewards

    assert reward_spec(user_rewards.trl_reward) == "fixtures.user_rewards:trl_reward"
    assert reward_spec("math") == "math"
    with pytest.raises(ValueError, match="module level"):
        reward_spec(lambda response, gold: 1.0)


def test_dapo_reward_in_the_pool():
    with RewardPool("dapo", num_workers=1) as pool:
        responses = ["...\nAnswer: 27", "...\nAnswer: 0.5", "so \\boxed{\\dfrac{1}{2}}"]
        assert pool.score_batch(responses, [27.0, "\\frac{1}{2}", "\\frac{1}{2}"]) == [1.0, 0.0, 1.0]
        # maj@k grouping with the dapo reward compares normalised strings
        assert pool.verify_pairs([("\\frac12", "\\dfrac{1}{2}"), ("0.5", "\\frac{1}{2}")]) == [True, False]
