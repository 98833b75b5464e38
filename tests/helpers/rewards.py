"""Reward functions used by trainer tests (imported by the reward pool's worker processes)."""

import time


def digit_reward(data_source, solution_str, ground_truth, extra_info=None):
    """verl signature. 1.0 when the response contains the gold's first digit: random tiny models
    hit it often enough that groups get mixed rewards and non-zero advantages."""
    return 1.0 if str(ground_truth)[0] in solution_str else 0.0


def sleepy_reward(data_source, solution_str, ground_truth, extra_info=None):
    """Hangs on responses containing the digit 3: the pool must kill the worker and score 0."""
    if "3" in solution_str:
        time.sleep(60)
    return 1.0 if str(ground_truth)[0] in solution_str else 0.0


def nan_reward(data_source, solution_str, ground_truth, extra_info=None):
    """NaN on responses containing the digit 3 (a user's bug): never silently dropped."""
    if "3" in solution_str:
        return float("nan")
    return 1.0 if str(ground_truth)[0] in solution_str else 0.0


def parity_reward(data_source, solution_str, ground_truth, extra_info=None):
    """Every response to an even gold scores 1: an all-equal group, which dynamic sampling drops.
    Odd golds score as ``digit_reward``, mostly mixed groups on a random tiny model."""
    if int(ground_truth) % 2 == 0:
        return 1.0
    return digit_reward(data_source, solution_str, ground_truth, extra_info)


def constant_reward(data_source, solution_str, ground_truth, extra_info=None):
    """0.5 for every response: every group has equal rewards, so no group carries a learning signal."""
    return 0.5
