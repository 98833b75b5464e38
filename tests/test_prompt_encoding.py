"""One prompt encoding for training, held-out evaluation, `stapo eval`, the teacher and the demo (issue 18),
and held-out accuracy on the unshaped verifier."""

from __future__ import annotations

import pytest
import torch

from stapo.config import build_config
from stapo.data.problem import Problem
from stapo.data.prompts import render_prompts, tokenize_prompt
from stapo.eval.harness import encode_prompt as eval_encode_prompt
from stapo.eval.settings import EvalSettings
from stapo.rollout import Generation, HFGenerator
from stapo.trainer.heldout import heldout_accuracy
from stapo.trainer.phases import generate_rollouts

PROBLEMS = [Problem("toy/0", "Compute 1 + 2.", "3", "toy"), Problem("toy/1", "Compute 30 + 4.", "34", "toy")]


def _bos_adding(tok, chat: bool):
    """A copy of the tiny tokenizer that adds BOS like a Llama-style tokenizer; ``chat``: its chat
    template starts with the BOS token (as Llama 3's does), else it has none."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    assert tok("Compute 1")["input_ids"][0] == tok.bos_token_id  # it really adds BOS
    if chat:
        tok.chat_template = "{{ bos_token }}" + tok.chat_template
    else:
        tok.chat_template = None
    return tok


class RecordingGenerator(HFGenerator):
    """The real HF backend, remembering the prompt ids it was asked to continue."""

    def generate(self, prompts, sampling):
        self.seen = [list(p) for p in prompts]
        return super().generate(prompts, sampling)


@pytest.mark.parametrize("chat", [False, True], ids=["bos-adding base tokenizer", "chat tokenizer"])
def test_training_heldout_and_eval_feed_identical_prompt_ids(tiny_model_dir, chat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = _bos_adding(AutoTokenizer.from_pretrained(tiny_model_dir), chat)
    cfg = build_config(None, ["rollout.n=1", "rollout.max_new_tokens=2", "data.template=none"])
    # training: render (data.prompts) -> encode and generate (phases.generate_rollouts)
    texts = render_prompts(PROBLEMS, tok, cfg)
    gen = RecordingGenerator(model, tok)
    batch = generate_rollouts(gen, tok, PROBLEMS, texts, cfg.rollout)
    train_ids = gen.seen
    assert [batch.prompt_ids[i][batch.prompt_mask[i]].tolist() for i in range(len(batch))] == train_ids
    # `stapo eval` with the same template and chat setting
    settings = EvalSettings(template=cfg.data.template, chat_template=cfg.data.use_chat_template)
    eval_ids = [eval_encode_prompt(p, tok, settings)[1] for p in PROBLEMS]
    assert train_ids == eval_ids
    for ids in train_ids:  # BOS exactly once, first
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    if chat:  # the rendered template carries BOS itself: the tokenizer must not add a second one
        assert texts[0].startswith("<bos>")
    # in-loop held-out evaluation
    from stapo.rewards import RewardPool

    held = RecordingGenerator(model, tok)
    with RewardPool("math", num_workers=1) as pool:
        heldout_accuracy(held, tok, pool, PROBLEMS, texts, cfg.rollout, samples=1, seed=0)
    assert held.seen == train_ids
    # the demo's SFT/eval encoding and the teacher's encoder are the same function
    from stapo.demo.sft import encode_prompt as demo_encode

    if chat:
        assert demo_encode(tok, PROBLEMS[0].prompt) == train_ids[0]
    assert tokenize_prompt(tok, texts[1]) == train_ids[1]


class ReplayGenerator:
    """Answers every prompt with fixed generations (the point here is the scoring, not the sampling)."""

    def __init__(self, texts_and_lengths):
        self.out = texts_and_lengths

    def generate(self, prompts, sampling):
        return [[Generation(list(range(n)), None, "stop", text) for _ in range(sampling.n)]
                for text, n in self.out[: len(prompts)]]

    def update_weights(self, model) -> None:
        pass


def test_heldout_accuracy_ignores_overlong_shaping(tiny_model_dir):
    """With DAPO's overlong penalty on, a right answer inside the buffer still counts as right."""
    from transformers import AutoTokenizer

    from stapo.rewards import RewardPool

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = build_config(None, ["rollout.max_new_tokens=32", "reward.overlong_buffer=8"])
    # 30 tokens: 6 into the 8-token buffer before 32, shaped score 1 − 6/8 = 0.25; 12 tokens: no penalty
    replay = ReplayGenerator([("so \\boxed{3}", 30), ("so \\boxed{35}", 12)])
    with RewardPool("math", num_workers=1, overlong=(32, 8)) as pool:
        shaped = pool.score_batch(["so \\boxed{3}"], ["3"], lengths=[30])
        assert shaped == [pytest.approx(0.25)]
        out = heldout_accuracy(replay, tok, pool, PROBLEMS, ["a", "b"], cfg.rollout, samples=2, seed=0)
    assert out["eval/accuracy"] == 0.5 and out["eval/greedy_accuracy"] == 0.5
