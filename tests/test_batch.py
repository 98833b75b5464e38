"""``RolloutBatch`` (select / split / concat / attention_mask) and ``collate_rollouts``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stapo.batch import RolloutBatch
from stapo.rollout.base import Generation
from stapo.rollout.collate import collate_rollouts

PAD = 0


def gen(ids, finish="stop", logprobs=True):
    return Generation(list(ids), [-0.5 * (i + 1) for i in range(len(ids))] if logprobs else None, finish,
                      text="t" + "".join(map(str, ids)))


def two_by_two(**kw):
    # prompt 0 = [11, 12, 13] with responses [5, 6, 7] and [] (empty); prompt 1 = [21] with [8, 9] and
    # [1, 2, 3, 4] (hit the length limit)
    gens = [[gen([5, 6, 7]), gen([])], [gen([8, 9]), gen([1, 2, 3, 4], "length")]]
    return collate_rollouts(["p0", "p1"], [[11, 12, 13], [21]], gens, PAD, **kw)


def assert_batches_equal(a: RolloutBatch, b: RolloutBatch):
    for f in dataclasses.fields(RolloutBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


# --- collate ----------------------------------------------------------------------------------------

def test_collate_pads_prompts_left_and_responses_right():
    b = two_by_two()
    assert len(b) == 4
    assert b.prompt_ids.tolist() == [[11, 12, 13], [11, 12, 13], [PAD, PAD, 21], [PAD, PAD, 21]]
    assert b.prompt_mask.tolist() == [[True] * 3, [True] * 3, [False, False, True], [False, False, True]]
    assert b.response_ids.tolist() == [[5, 6, 7, PAD], [PAD] * 4, [8, 9, PAD, PAD], [1, 2, 3, 4]]
    assert b.response_mask.tolist() == [[1, 1, 1, 0], [0] * 4, [1, 1, 0, 0], [1] * 4]
    assert b.response_mask.dtype == torch.bool and b.prompt_ids.dtype == torch.long
    assert b.group_ids.tolist() == [0, 0, 1, 1]
    assert b.truncated.tolist() == [False, False, False, True]
    assert b.response_lengths.tolist() == [3, 0, 2, 4]
    assert b.problems == ["p0", "p0", "p1", "p1"]
    assert b.response_texts == ["t567", "t", "t89", "t1234"]
    # engine log-probs land on their tokens, padded positions hold 0
    assert b.rollout_logprobs.tolist() == [[-0.5, -1.0, -1.5, 0.0], [0.0] * 4, [-0.5, -1.0, 0.0, 0.0],
                                           [-0.5, -1.0, -1.5, -2.0]]
    assert b.rewards is None and b.advantages is None and b.old_logprobs is None


def test_collate_options_and_errors():
    # DAPO overlong filtering: the truncated response leaves the loss but keeps its tokens and length
    b = two_by_two(mask_truncated=True)
    assert b.response_mask[3].tolist() == [False] * 4 and b.response_ids[3].tolist() == [1, 2, 3, 4]
    assert b.response_lengths[3] == 4 and b.response_mask[:3].equal(two_by_two().response_mask[:3])
    # one engine without log-probs: none are reported
    gens = [[gen([5]), gen([6], logprobs=False)]]
    assert collate_rollouts(["p"], [[1]], gens, PAD).rollout_logprobs is None
    # all responses empty: T = 1, fully masked
    b = collate_rollouts(["p"], [[1, 2]], [[gen([]), gen([])]], PAD)
    assert b.response_ids.shape == (2, 1) and not b.response_mask.any()
    with pytest.raises(ValueError, match="no generations"):
        collate_rollouts([], [], [], PAD)


# --- attention mask and input ids ---------------------------------------------------------------------

def test_attention_mask_and_input_ids():
    b = two_by_two()
    # a hole inside a response (e.g. a masked-out tool output) must stay attended; padding after the
    # last valid token must not; an empty response attends to nothing of its own
    b.response_mask[0] = torch.tensor([True, False, True, False])
    assert b.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
    ]
    assert b.attention_mask.dtype == torch.long
    assert b.input_ids.tolist()[2] == [PAD, PAD, 21, 8, 9, PAD, PAD]
    assert b.input_ids.shape == (4, 7)


# --- select / split / concat ---------------------------------------------------------------------------

def scored(b: RolloutBatch) -> RolloutBatch:
    B, T = b.response_ids.shape
    return dataclasses.replace(
        b,
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        advantages=torch.arange(B, dtype=torch.float32),
        old_logprobs=-torch.arange(B * T, dtype=torch.float32).view(B, T),
    )


@pytest.mark.parametrize("index,rows", [
    (slice(1, 3), [1, 2]),
    (slice(None, None, -1), [3, 2, 1, 0]),
    ([3, 0], [3, 0]),
    (torch.tensor([2]), [2]),
    ([-1], [3]),
    (torch.tensor([True, False, False, True]), [0, 3]),  # a row mask, e.g. rewards > 0
    ([], []),
])
def test_select(index, rows):
    b = scored(two_by_two())
    s = b.select(index)
    assert len(s) == len(rows)
    assert s.group_ids.tolist() == [b.group_ids[r].item() for r in rows]
    assert s.problems == [b.problems[r] for r in rows]
    assert s.response_texts == [b.response_texts[r] for r in rows]
    assert s.old_logprobs.tolist() == [b.old_logprobs[r].tolist() for r in rows]
    assert s.response_ids.shape[1] == b.response_ids.shape[1]  # widths unchanged
    assert s.ref_logprobs is None


def test_select_errors():
    b = two_by_two()
    with pytest.raises(IndexError):
        b.select([4])
    with pytest.raises(ValueError, match="bool row mask"):
        b.select(torch.tensor([True, False]))


def test_split_and_concat_round_trip():
    b = scored(two_by_two())
    for size in (1, 2, 3, 4, 9):
        parts = b.split(size)
        assert [len(p) for p in parts] == [min(size, 4 - i) for i in range(0, 4, size)]
        assert_batches_equal(RolloutBatch.concat(parts, pad_token_id=PAD), b)
    with pytest.raises(ValueError, match="split size"):
        b.split(0)


def test_concat_repads_to_common_widths():
    # batches from two steps with different prompt and response widths
    a = scored(two_by_two())
    c = collate_rollouts(["q"], [[31, 32, 33, 34]], [[gen([7] * 6)]], pad_token_id=99)
    c = dataclasses.replace(c, rewards=torch.tensor([1.0]), advantages=torch.tensor([0.5]),
                            old_logprobs=torch.full((1, 6), -1.0))
    out = RolloutBatch.concat([a, c], pad_token_id=99)
    assert out.prompt_ids.shape == (5, 4) and out.response_ids.shape == (5, 6)
    assert out.prompt_ids[0].tolist() == [99, 11, 12, 13]  # prompts re-padded on the left
    assert out.prompt_mask[0].tolist() == [False, True, True, True]
    assert out.response_ids[2].tolist() == [8, 9, PAD, PAD, 99, 99]  # responses on the right
    assert out.response_mask[2].tolist() == [True, True, False, False, False, False]
    assert out.old_logprobs[0].tolist()[4:] == [0.0, 0.0]
    assert out.rollout_logprobs.shape == (5, 6)
    assert out.advantages.tolist() == [0.0, 1.0, 2.0, 3.0, 0.5]
    assert out.problems == ["p0", "p0", "p1", "p1", "q"]
    # the attention mask still covers exactly the real tokens
    assert out.attention_mask[2].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert out.select([4]).input_ids.tolist() == [[31, 32, 33, 34] + [7] * 6]


def test_concat_errors():
    a = scored(two_by_two())
    with pytest.raises(ValueError, match="nothing"):
        RolloutBatch.concat([])
    with pytest.raises(ValueError, match="'rewards'"):  # set in one batch only: rows would misalign
        RolloutBatch.concat([a, two_by_two()])
    with pytest.raises(ValueError, match="'rewards'"):
        RolloutBatch.concat([two_by_two(), a])
    with pytest.raises(ValueError, match="'problems'"):
        RolloutBatch.concat([a, dataclasses.replace(a, problems=[])])
    token_adv = dataclasses.replace(a, advantages=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="'advantages'"):
        RolloutBatch.concat([a, token_adv])


def test_to_keeps_values():
    b = scored(two_by_two())
    assert_batches_equal(b.to("cpu"), b)
