"""The statistics the benchmark reports quote: the t quantile and the paired seed-by-seed comparison."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from demo_objectives import paired_comparison, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.706205), (2, 4.302653), (7, 2.364624), (30, 2.042272)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_paired_comparison_by_hand():
    a = {0: 0.50, 1: 0.40, 2: 0.30, 3: 0.90}  # seed 3 has no partner: left out
    b = {0: 0.40, 1: 0.45, 2: 0.10}
    c = paired_comparison(a, b)
    d = [0.10, -0.05, 0.20]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert c["n"] == 3 and c["diff"] == pytest.approx(d)
    assert c["ci"] == pytest.approx((mean - half, mean + half), abs=1e-5)
    # sign patterns whose |mean| >= |0.25/3|: (+,+,+), (+,-,+) and their negations, so 4 of 8
    assert c["p_sign_flip"] == pytest.approx(4 / 8)


def test_sign_flip_p_is_the_smallest_possible_when_every_seed_agrees():
    c = paired_comparison({s: 1.0 + s for s in range(8)}, {s: 0.5 for s in range(8)})
    assert c["p_sign_flip"] == pytest.approx(2 / 256)
