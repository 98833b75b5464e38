"""The demo's task, tokenizer, SFT and cached base model (real tokenizer, real tiny Qwen3)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from stapo.demo import assets, build_base_model, encode_example, encode_prompt, exact_reward, make_problems
from stapo.demo.sft import IGNORE, collate_sft, sft_loss
from stapo.demo.task import SPLIT_MODULUS, split_of

# a build small enough for a unit test: 20 SFT steps of 32 examples
# (one validation check at step 10 on 16 problems; a target of 1.0 is out of reach, so all 20 steps run)
TINY = {
    "sft_steps": 20,
    "sft_batch_size": 32,
    "sft_lr": 1e-3,
    "tokenizer_problems": 500,
    "sft_target_accuracy": 1.0,
    "sft_check_every": 10,
    "sft_check_problems": 16,
}

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (-?\d+)\.")


# ---------------------------------------------------------------- task


def test_make_problems_is_deterministic_and_distinct():
    a, b = make_problems(200, seed=3), make_problems(200, seed=3)
    assert a == b
    assert len({p.id for p in a}) == 200
    assert {p.id for p in a} != {p.id for p in make_problems(200, seed=4)}
    assert all(p.source == "demo_arith" and isinstance(p.answer, str) for p in a)


def test_splits_are_disjoint_across_seeds():
    train = {p.prompt for s in (0, 1) for p in make_problems(2000, s, "train", distinct=False)}
    valid = {p.prompt for s in (0, 1) for p in make_problems(300, s, "valid")}
    heldout = {p.prompt for s in (0, 1) for p in make_problems(500, s, "heldout")}
    assert not train & heldout and not train & valid and not valid & heldout
    # the partition is a function of the expression alone
    assert all(split_of(p[len("Compute ") : -1]) == "heldout" for p in heldout)
    # and each of valid/heldout gets about 1/SPLIT_MODULUS of the space (binomial, n=3969: sd ~0.005)
    drawn = [f"{a} + {b}" for a in range(1, 64) for b in range(1, 64)]
    for split in ("valid", "heldout"):
        frac = sum(split_of(e) == split for e in drawn) / len(drawn)
        assert abs(frac - 1 / SPLIT_MODULUS) < 0.03, split


def test_iid_stream_repeats_two_operand_problems_and_keeps_the_mix():
    stream = make_problems(20_000, 0, "train", distinct=False)
    assert len({p.id for p in stream}) < len(stream)  # only ~11k two-operand train expressions exist
    two = sum(p.prompt.count(" ") == 3 for p in stream) / len(stream)  # "Compute a + b." has 3 spaces
    # Expected share of 2-operand problems after rejecting negative running totals, operands
    # uniform in 1..N (N=99), each operator + or - with probability 1/2:
    #   P(ok | 2 ops) = 1/2 + 1/2 P(a >= b)
    #   P(ok | 3 ops) = 1/4 [1 + P(a + b >= c) + P(a >= b) + P(a >= b + c)]
    # counting pairs by their sum s = a + b (s - 1 pairs each).
    n = 99
    a_ge_b = n * (n + 1) / 2 / n**2
    c_gt_sum = sum((s - 1) * (n - s) for s in range(2, n)) / n**3
    a_ge_sum = sum((s - 1) * (n + 1 - s) for s in range(2, n + 1)) / n**3
    ok2 = 0.5 + 0.5 * a_ge_b
    ok3 = 0.25 * (1 + (1 - c_gt_sum) + a_ge_b + a_ge_sum)
    assert abs(two - ok2 / (ok2 + ok3)) < 0.015  # ~0.545; binomial sd at n=20000 is 0.0035


def test_every_reference_solution_is_correct():
    problems = make_problems(1500, 0, "train") + make_problems(500, 0, "heldout")
    n_ops = set()
    for p in problems:
        expr = re.fullmatch(r"Compute ((?:\d+ [+-] )+\d+)\.", p.prompt).group(1)
        tokens = expr.split()
        operands = [int(x) for x in tokens[::2]]
        n_ops.add(len(operands))
        assert all(1 <= x <= 99 for x in operands), p
        # chained steps, each one right, each starting from the previous result
        steps = STEP.findall(p.meta["solution"])
        assert len(steps) == len(operands) - 1, p
        total = operands[0]
        for (a, op, b, c), x, want_op in zip(steps, operands[1:], tokens[1::2]):
            assert (int(a), op, int(b)) == (total, want_op, x), p
            total = total + x if op == "+" else total - x
            assert int(c) == total and total >= 0, p  # negative running totals are avoided by design
        assert p.answer == str(total) == str(eval(expr))  # the prompt regex admits digits and +/- only
        assert p.meta["solution"].endswith(f"\\boxed{{{total}}}")
        assert exact_reward(p.meta["solution"], p.answer) == 1.0
    assert n_ops == {2, 3}


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ("37 + 48 = 85. 85 - 19 = 66. \\boxed{66}", 1.0),
        ("\\boxed{ 66 }", 1.0),
        ("\\boxed{+66}", 1.0),
        ("\\boxed{65} then \\boxed{66}", 1.0),  # the last box counts
        ("\\boxed{66} then \\boxed{65}", 0.0),
        ("66", 0.0),  # no box
        ("\\boxed{66.0}", 0.0),
        ("\\boxed{x=66}", 0.0),
        ("\\boxed{-66}", 0.0),
        ("\\boxed{660}", 0.0),
    ],
)
def test_exact_reward(text, reward):
    assert exact_reward(text, "66") == reward


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="split"):
        make_problems(3, 0, "test")
    with pytest.raises(ValueError, match="max_operand"):
        make_problems(3, 0, max_operand=0)
    with pytest.raises(ValueError, match="n: cannot draw"):
        make_problems(100, 0, max_operand=2)  # the space holds fewer than 100 problems
    with pytest.raises(ValueError, match="answer"):
        exact_reward("\\boxed{1}", "one")
    with pytest.raises(ValueError, match="meta"):
        encode_example(None, make_problems(1, 0)[0].__class__("x", "Compute 1 + 1.", "2", "demo_arith"))
    with pytest.raises(ValueError, match="sft_steps"):
        assets.BaseModelSettings(sft_steps=0)
    with pytest.raises(TypeError, match="sft_stepz"):
        build_base_model("/nonexistent", sft_stepz=3)


# ---------------------------------------------------------------- tokenizer and SFT encoding


@pytest.fixture(scope="module")
def tokenizer():
    return assets.build_tokenizer(assets.BaseModelSettings(**TINY))


def test_tokenizer_round_trips_and_splits_digits(tokenizer):
    held = make_problems(300, 7, "heldout")
    for p in held:
        text = (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p.prompt}], tokenize=False, add_generation_prompt=True
            )
            + p.meta["solution"]
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text  # nothing dropped (the BPE has no unknown token)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        assert all(len(t) == 1 for t in pieces if any(ch.isdigit() for ch in t)), pieces
    assert len(tokenizer) < 96  # the corpus runs out of merges before the cap


def test_encode_example_matches_the_chat_template_and_joint_tokenization(tokenizer):
    p = make_problems(1, 0, "heldout")[0]
    prompt_ids, response_ids = encode_example(tokenizer, p)
    prompt_text = tokenizer.decode(prompt_ids)
    assert prompt_text == f"Question: {p.prompt}\nAnswer: "
    assert prompt_ids == encode_prompt(tokenizer, p.prompt)
    assert response_ids[-1] == tokenizer.eos_token_id
    # tokenising prompt and response apart gives the same ids as tokenising them together,
    # so the sampled responses during RL live in the same token space as the SFT targets
    joint = tokenizer(prompt_text + p.meta["solution"], add_special_tokens=False)["input_ids"]
    assert prompt_ids + response_ids[:-1] == joint


def test_collate_sft_masks_everything_but_the_response(tokenizer):
    ex = [encode_example(tokenizer, p) for p in make_problems(5, 0)]
    batch = collate_sft(ex, tokenizer.pad_token_id)
    for i, (p, r) in enumerate(ex):
        labels = batch["labels"][i]
        assert labels[: len(p)].eq(IGNORE).all() and labels[len(p) + len(r) :].eq(IGNORE).all()
        assert labels[len(p) : len(p) + len(r)].tolist() == r
        assert batch["attention_mask"][i].sum() == len(p) + len(r)


# ---------------------------------------------------------------- build_base_model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo_cache")
    messages: list[str] = []
    path = build_base_model(cache, log=messages.append, **TINY)
    return cache, path, messages


def test_build_saves_a_loadable_model_and_tokenizer(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.rollout import HFGenerator, SamplingConfig

    cache, path, messages = built
    assert path.parent == cache and path == assets.base_model_dir(cache, assets.BaseModelSettings(**TINY))
    assert [c.name for c in cache.iterdir()] == [path.name]  # the temp build dir was renamed away
    assert any("20 SFT steps, loss" in m for m in messages)
    # the warm start's progress: its first step (with an ETA) and its end, through the caller's log
    sft = [m for m in messages if m.startswith("demo warm start (SFT): ")]
    assert re.fullmatch(r"demo warm start \(SFT\): 1/20 steps \(5%\), 0:\d\d elapsed, ETA \d+:\d\d, loss \d\.\d{3}",
                        sft[0]), sft
    assert re.fullmatch(r"demo warm start \(SFT\): 20/20 steps, done in \d+:\d\d, loss \d\.\d{3}", sft[-1]), sft
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert (
        model.config.hidden_size == 128
        and model.config.num_hidden_layers == 2
        and model.config.head_dim == 32
    )
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 0.56e6
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    p = make_problems(1, 0, "heldout")[0]
    assert encode_prompt(tok, p.prompt) == encode_prompt(
        assets.build_tokenizer(assets.BaseModelSettings(**TINY)), p.prompt
    )
    gens = HFGenerator(model, tok).generate(
        [encode_prompt(tok, p.prompt)], SamplingConfig(0.0, max_new_tokens=8)
    )
    assert len(gens) == 1 and len(gens[0][0].response_ids) >= 1


def test_second_build_reuses_the_cache(built):
    cache, path, _ = built
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    messages: list[str] = []
    assert build_base_model(cache, log=messages.append, **TINY) == path
    assert weights.stat().st_mtime_ns == before
    assert messages == [f"demo base model: reusing {path}"]
    # a directory whose recorded hash disagrees with the settings is not a hit
    fake = cache / "tampered"
    shutil.copytree(path, fake)
    info = json.loads((fake / assets.INFO_FILE).read_text())
    info["hash"] = "0" * 64
    (fake / assets.INFO_FILE).write_text(json.dumps(info))
    assert assets.is_built(path, assets.BaseModelSettings(**TINY))
    assert not assets.is_built(fake, assets.BaseModelSettings(**TINY))
    assert not assets.is_built(path, assets.BaseModelSettings(**{**TINY, "seed": 1}))


def test_sft_reduces_the_response_loss_on_heldout_problems(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.models.tiny import tiny_qwen3

    _, path, _ = built
    tok = AutoTokenizer.from_pretrained(path)
    trained = AutoModelForCausalLM.from_pretrained(path).eval()
    untrained = tiny_qwen3(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=0)
    batch = collate_sft([encode_example(tok, p) for p in make_problems(64, 5, "heldout")], tok.pad_token_id)
    with torch.no_grad():
        before, after = sft_loss(untrained, batch).item(), sft_loss(trained, batch).item()
    # random init sits near ln(vocab) ~ 4.3 nats; 20 steps bring the held-out loss well below that
    assert before > 3.5
    assert after < 0.75 * before, (before, after)
    info = json.loads((path / assets.INFO_FILE).read_text())
    assert len(info["sft"]["losses"]) == info["sft"]["steps_taken"] == TINY["sft_steps"]
    assert info["sft"]["last_loss"] < info["sft"]["first_loss"]
    # the validation check ran once, at step 10, and (target 1.0 unmet) did not stop the pass
    [(step, acc)] = info["sft"]["valid_checks"]
    assert step == 10 and 0.0 <= acc < 1.0


def test_train_sft_stops_when_told(tokenizer):
    from stapo.demo.sft import train_sft
    from stapo.models.tiny import tiny_qwen3

    model = tiny_qwen3(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    examples = [encode_example(tokenizer, p) for p in make_problems(8, 0)]
    asked: list[int] = []

    def stop(step):
        asked.append(step)
        return step >= 4

    losses = train_sft(
        model, examples, pad_token_id=0, steps=10, batch_size=4, lr=1e-3, stop=stop, stop_every=2
    )
    assert asked == [2, 4] and len(losses) == 4
    assert not model.training
