"""`stapo analyze`: the share of low-p tokens inside correct vs incorrect responses (hand-worked)."""

import json

import pyarrow as pa

from stapo.diagnostics.report import _low_p_section, low_p_share


def _table(p, reward, valid, tau=None):
    t = pa.table({"p": pa.array(p, pa.float32()), "reward": pa.array(reward, pa.float32()),
                  "valid": pa.array(valid)})
    return t.replace_schema_metadata({"stapo": json.dumps({"prob_threshold": tau})}) if tau else t


def test_low_p_share_hand_worked():
    # two correct responses (3 tokens each), one incorrect (4 tokens), one padded-out token (invalid)
    p = [0.5, 0.001, 0.9, 0.0001, 0.7, 0.8, 0.001, 0.0005, 0.3, 0.6, 0.0001]
    reward = [1.0] * 6 + [0.0] * 4 + [0.0]
    valid = [True] * 10 + [False]
    s = low_p_share(_table(p, reward, valid), prob_threshold=0.002)
    assert s["tokens"] == 10 and s["low_p"] == 4
    assert s["in_correct"] == 2 and s["in_incorrect"] == 2
    assert s["share_in_correct"] == 0.5
    assert s["rate_in_correct"] == 2 / 6 and s["rate_in_incorrect"] == 2 / 4
    assert s["of_all_in_correct"] == 2 / 10
    # the threshold comes from the dump's metadata when not given: at 0.0008 two low-p tokens remain
    s = low_p_share(_table(p, reward, valid, tau=0.0008))
    assert s["prob_threshold"] == 0.0008 and (s["in_correct"], s["in_incorrect"]) == (1, 1)


def test_low_p_share_dapo_rewards_and_empty():
    # DAPO's ±1 rewards: −1 is incorrect
    s = low_p_share(_table([0.001, 0.001, 0.5], [1.0, -1.0, -1.0], [True] * 3), prob_threshold=0.002)
    assert (s["in_correct"], s["in_incorrect"]) == (1, 1)
    assert low_p_share(_table([0.5], [1.0], [False]), prob_threshold=0.002) is None
    none_low = low_p_share(_table([0.5, 0.6], [1.0, 0.0], [True, True]), prob_threshold=0.002)
    assert none_low["low_p"] == 0 and none_low["share_in_correct"] is None


def test_low_p_section_renders_the_numbers():
    s = low_p_share(_table([0.001, 0.5, 0.001, 0.4], [1.0, 1.0, 0.0, 0.0], [True] * 4), prob_threshold=0.002)
    text = "\n".join(_low_p_section(s))
    assert "2 of 4" in text and "| low-p tokens | 1 | 1 |" in text and "**0.25**" in text
    assert "No valid tokens" in "\n".join(_low_p_section(None))
