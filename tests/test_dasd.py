"""DASD (issue 10): router, objectives vs a float64 reference, β = 0 ≡ justrl, micro-batch invariance,
the teacher context, the teacher pass (alignment, no gradient) and one real training step.

Layers as in test_objectives.py: hand-worked router values; each self-distillation objective against
a plain-Python float64 reference of Â fed to the justrl reference; exact equalities; accumulation
over micro-batches; then the real tiny model for the teacher pass and the trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import float64_reference as ref
from stapo.data.problem import Problem
from stapo.data.prompts import build_prompt
from stapo.distill import (
    HINT_TEMPLATES,
    compute_teacher_logprobs,
    privileged_hint,
    teacher_prompt,
    teacher_prompt_ids,
)
from stapo.objectives import (
    TokenStats,
    count_units,
    get_objective,
    loss_token_mask,
    minibatch_overrides,
    policy_loss,
    router_weight,
)
from stapo.objectives.training import objective_from_config
from stapo.rollout import collate_rollouts
from stapo.rollout.base import Generation

NAMES = ("dasd", "dasd_reverse", "opsd")
DISTILL_KEYS = ("distill/attract_fraction", "distill/repel_fraction", "distill/delta_mean",
                "distill/delta_bar_mean", "distill/omega_mean", "distill/kl_teacher")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- the router ω on constructed entropies -----------------------------------------------------------

def test_router_sign_and_magnitude_hand_worked():
    # one trajectory of 5 tokens, padded to 7; a second row with different entropies must not matter
    H = torch.tensor([[0.1, 0.2, 0.3, 0.4, 2.0, 9.0, 9.0],
                      [5.0, 0.0, 3.0, 1.0, 4.0, 2.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7], dtype=torch.bool)
    dbar = torch.tensor([[1.0, 0.0, -3.0, 1.0, 1.0, 0.0, 0.0], [0.5] * 7], dtype=torch.float64)
    omega = router_weight(H, dbar, mask, quantile=0.8)
    # τ = 0.8-quantile of [0.1, 0.2, 0.3, 0.4, 2.0]: position 0.8·4 = 3.2 -> 0.4 + 0.2·(2.0 − 0.4) = 0.72
    # σ_H = mean |H − 0.6| = (0.5 + 0.4 + 0.3 + 0.2 + 1.4) / 5 = 0.56
    tau, mad = 0.72, 0.56
    expected = [math.tanh((tau - h) / mad) * sigmoid(abs(d) - 1) for h, d in
                zip([0.1, 0.2, 0.3, 0.4, 2.0], [1.0, 0.0, -3.0, 1.0, 1.0])]
    # e.g. token 0: tanh(0.62/0.56) = 0.8030, gate sigmoid(0) = 0.5 -> ω = 0.4015 (attract)
    assert expected[0] == pytest.approx(0.4015, abs=1e-4)
    # token 4 (the top-20% entropy): tanh(−1.28/0.56) = −0.9797, gate 0.5 -> ω = −0.4898 (repel)
    assert expected[4] == pytest.approx(-0.4898, abs=1e-4)
    torch.testing.assert_close(omega[0, :5], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert torch.equal(omega[0, 5:], torch.zeros(2, dtype=torch.float64))  # padding: no direction
    assert (omega[0, :4] > 0).all() and omega[0, 4] < 0
    # the |δ̄| gate orders magnitudes at equal direction: |δ̄| = 3 (token 2) > 1 > 0
    assert sigmoid(2.0) > sigmoid(0.0) > sigmoid(-1.0)
    # row 1 on its own gives the same ω (per-trajectory statistics)
    torch.testing.assert_close(router_weight(H[1:], dbar[1:], mask[1:]), omega[1:], rtol=0, atol=0)


def test_router_repels_the_top_entropy_fraction():
    g = torch.Generator().manual_seed(0)
    H = torch.rand(3, 1000, generator=g, dtype=torch.float64) * 4  # distinct values
    mask = torch.ones(3, 1000, dtype=torch.bool)
    for q in (0.8, 0.5):
        omega = router_weight(H, torch.ones_like(H), mask, quantile=q)
        # linear quantile at position q·999: exactly the (1 − q)·1000 largest entropies lie above τ
        assert ((omega < 0).sum(dim=1) == round((1 - q) * 1000)).all()
        assert ((omega > 0).sum(dim=1) == round(q * 1000)).all()
        order = H.argsort(dim=1)
        assert (omega.gather(1, order[:, -1:]) < 0).all() and (omega.gather(1, order[:, :1]) > 0).all()


def test_router_degenerate_rows():
    H = torch.tensor([[1.5, 1.5, 1.5], [0.7, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    omega = router_weight(H, torch.full_like(H, 2.0), mask)
    # equal entropies (σ_H = 0), a single token and an empty row: no direction, exactly 0, never NaN
    assert torch.equal(omega, torch.zeros_like(omega))


# --- the objectives against a plain-Python float64 reference -------------------------------------

def ref_token_advantages(name, old, teacher, ent, adv, mask, beta=0.1, q=0.8, eps=1e-6, norm="standardize"):
    """Â [B][T] and ω, δ, δ̄ (lists) from the issue's formulas, with Python floats and loops."""
    B, T = len(mask), len(mask[0])
    A = ref.per_token(adv, B, T)
    delta = [[teacher[b][t] - old[b][t] if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    vals = [delta[b][t] for b in range(B) for t in range(T) if mask[b][t]]
    if norm == "standardize" and vals:
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        dbar = [[(delta[b][t] - mu) / max(sd, 1e-8) if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    else:
        dbar = delta
    omega = [[0.0] * T for _ in range(B)]
    for b in range(B):
        hs = [ent[b][t] for t in range(T) if mask[b][t]]
        if not hs:
            continue
        tau = ref.quantile_linear(hs, q)
        m = sum(hs) / len(hs)
        mad = max(sum(abs(h - m) for h in hs) / len(hs), eps)
        for t in range(T):
            if not mask[b][t]:
                continue
            direction = math.tanh((tau - ent[b][t]) / mad) * sigmoid(abs(dbar[b][t]) - 1.0)
            omega[b][t] = {"dasd": direction, "dasd_reverse": -direction, "opsd": 1.0}[name]
    ahat = [[A[b][t] + beta * omega[b][t] * dbar[b][t] if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    return ahat, omega, delta, dbar


def distill_batch(seed, B=6, T=10, dtype=torch.float64, layout="right", token_adv=False):
    batch = ref.random_batch(seed, B, T, dtype=dtype, ratio_scale=0.5, layout=layout, token_adv=token_adv)
    g = torch.Generator().manual_seed(seed + 1)
    batch["teacher_logprobs"] = (batch["old_logprobs"].double() + 0.3
                                 + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    return batch


def run(name, batch, **kw):
    lp = batch["logprobs"].detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(name, lp, batch["old_logprobs"], batch["advantages"], batch["response_mask"],
                                entropy=batch["entropy"], teacher_logprobs=batch["teacher_logprobs"], **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def masked_mean(values, mask):
    picked = [v for rv, rm in zip(values, mask) for v, m in zip(rv, rm) if m]
    return sum(picked) / len(picked) if picked else 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("opts", [{}, {"beta": 0.7}, {"delta_norm": "none"}, {"router_quantile": 0.5}])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(["right", "left", "holes"]))
def test_matches_float64_reference(name, opts, seed, layout):
    if name == "opsd" and "router_quantile" in opts:
        opts = {}  # opsd has no router
    batch = distill_batch(seed, layout=layout)
    loss, grad, metrics = run(name, batch, **opts)
    mask = batch["response_mask"].tolist()
    ahat, omega, delta, dbar = ref_token_advantages(
        name, *(ref.as_lists(batch[k]) for k in ("old_logprobs", "teacher_logprobs", "entropy", "advantages")),
        mask, beta=opts.get("beta", 0.1), q=opts.get("router_quantile", 0.8), norm=opts.get("delta_norm", "standardize"))
    want_loss, want_grad, want_metrics = ref.objective(
        "justrl", batch["logprobs"], batch["old_logprobs"], torch.tensor(ahat, dtype=torch.float64),
        batch["response_mask"], entropy=batch["entropy"])
    assert float(loss) == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-13)
    want_metrics |= {
        "distill/attract_fraction": masked_mean([[float(w > 0) for w in r] for r in omega], mask),
        "distill/repel_fraction": masked_mean([[float(w < 0) for w in r] for r in omega], mask),
        "distill/delta_mean": masked_mean(delta, mask),
        "distill/delta_bar_mean": masked_mean(dbar, mask),
        "distill/omega_mean": masked_mean(omega, mask),
        "distill/kl_teacher": masked_mean([[math.expm1(d) - d for d in r] for r in delta], mask),
    }
    assert set(metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        assert float(metrics[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_direction_of_the_ablations():
    batch = distill_batch(3, B=8, T=16)
    _, _, dasd = run("dasd", batch)
    _, _, rev = run("dasd_reverse", batch)
    _, _, opsd = run("opsd", batch)
    # the reverse swaps exactly which tokens are attracted and repelled; OPSD attracts everything
    assert float(dasd["distill/attract_fraction"]) == pytest.approx(float(rev["distill/repel_fraction"]))
    assert float(dasd["distill/repel_fraction"]) == pytest.approx(float(rev["distill/attract_fraction"]))
    assert 0.1 < float(dasd["distill/repel_fraction"]) < 0.4  # ≈ the top 20% of each row's entropy
    assert float(opsd["distill/attract_fraction"]) == 1.0 and float(opsd["distill/repel_fraction"]) == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("token_adv", [False, True])
def test_beta_zero_is_justrl_exactly(name, dtype, token_adv):
    batch = distill_batch(7, dtype=dtype, token_adv=token_adv)
    loss, grad, metrics = run(name, batch, beta=0.0)
    lp = batch["logprobs"].detach().clone().requires_grad_(True)
    j_loss, j_metrics = policy_loss("justrl", lp, batch["old_logprobs"], batch["advantages"],
                                    batch["response_mask"], entropy=batch["entropy"])
    j_loss.backward()
    assert torch.equal(loss, j_loss.detach()) and torch.equal(grad, lp.grad)
    for k, v in j_metrics.items():
        assert torch.equal(metrics[k], v), k


def test_beta_changes_the_loss():
    batch = distill_batch(7)
    assert float(run("dasd", batch, beta=0.5)[0]) != float(run("dasd", batch, beta=0.0)[0])


def test_only_the_surrogate_carries_gradient():
    """δ, ω and Â are constants: no gradient reaches the teacher, old log-probs or the entropy."""
    batch = distill_batch(5)
    leaves = {k: batch[k].detach().clone().requires_grad_(True)
              for k in ("logprobs", "old_logprobs", "teacher_logprobs", "entropy")}
    for name in NAMES:
        loss, _ = policy_loss(name, leaves["logprobs"], leaves["old_logprobs"], batch["advantages"],
                              batch["response_mask"], entropy=leaves["entropy"],
                              teacher_logprobs=leaves["teacher_logprobs"])
        grads = torch.autograd.grad(loss, [leaves["logprobs"], leaves["teacher_logprobs"], leaves["entropy"]],
                                    allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        assert grads[1] is None and grads[2] is None, name


# --- micro-batches: the mini-batch-wide δ moments make the split irrelevant ----------------------

def accumulate(name, batch, k, beta, use_overrides=True):
    """What update_policy does on a fresh step: stats (old log-probs) -> overrides -> k backward passes."""
    B = batch["response_mask"].shape[0]
    bounds = [(i * B // k, (i + 1) * B // k) for i in range(k)]
    micro = [{key: v[a:b] for key, v in batch.items()} for a, b in bounds]
    stats = [TokenStats(m["old_logprobs"], m["entropy"], m["advantages"], m["response_mask"], m["teacher_logprobs"])
             for m in micro]
    over = minibatch_overrides(name, stats, beta=beta) if use_overrides else {}
    denominator = sum(count_units(loss_token_mask(name, s.logprobs, s.entropy, s.advantages, s.response_mask,
                                                  beta=beta, **over), "token-mean") for s in stats)
    lp = batch["logprobs"].detach().clone().requires_grad_(True)
    total = 0.0
    for (a, b), m in zip(bounds, micro):
        loss, _ = policy_loss(name, lp[a:b], m["old_logprobs"], m["advantages"], m["response_mask"],
                              entropy=m["entropy"], teacher_logprobs=m["teacher_logprobs"],
                              denominator=denominator, beta=beta, **over)
        loss.backward()
        total = total + loss.detach()
    return total, lp.grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["right", "holes"])
def test_micro_batch_accumulation_equals_the_whole_batch(name, layout):
    batch = distill_batch(11, B=8, T=12, layout=layout)
    whole_loss, whole_grad, _ = run(name, batch, beta=0.5)  # β = 0.5: the teacher term matters
    for k in (2, 3, 8):
        loss, grad = accumulate(name, batch, k, 0.5)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)
    # without the mini-batch moments each micro-batch standardises δ on its own: a different update
    _, grad_local = accumulate(name, batch, 4, 0.5, use_overrides=False)
    assert not torch.allclose(grad_local, whole_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [-math.inf, math.nan, 1e30])
def test_padding_garbage_in_the_teacher_does_not_leak(name, garbage):
    batch = distill_batch(13, B=5, T=8)
    batch["response_mask"][0] = False  # and an empty row
    clean = run(name, batch)
    dirty = dict(batch)
    dirty["teacher_logprobs"] = batch["teacher_logprobs"].masked_fill(~batch["response_mask"], garbage)
    got = run(name, dirty)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])
    for k in DISTILL_KEYS:
        assert torch.equal(got[2][k], clean[2][k]), k


def test_clear_errors():
    batch = distill_batch(1)
    args = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"])
    with pytest.raises(ValueError, match="teacher_logprobs"):
        policy_loss("dasd", *args, entropy=batch["entropy"])
    with pytest.raises(ValueError, match="entropy"):
        policy_loss("dasd", *args, teacher_logprobs=batch["teacher_logprobs"])
    with pytest.raises(ValueError, match="delta_norm"):
        policy_loss("opsd", *args, teacher_logprobs=batch["teacher_logprobs"], delta_norm="zscore")
    with pytest.raises(ValueError, match="router_quantile"):
        get_objective("dasd").config(router_quantile=1.5)
    stats = TokenStats(batch["old_logprobs"], batch["entropy"], batch["advantages"], batch["response_mask"])
    with pytest.raises(ValueError, match="teacher_logprobs"):
        minibatch_overrides("opsd", [stats])
    assert get_objective("dasd").config().beta == 0.1 and get_objective("dasd").config().router_quantile == 0.8


# --- the teacher context ---------------------------------------------------------------------------

WITH_SOLUTION = Problem("t/1", "Compute {x} if x = 2 + 3.", "5", "t", {"solution": "2 + 3 = 5. \\boxed{5}"})
WITHOUT = Problem("t/2", "Compute 7 - 4.", "3", "t", {})
LIST_ANSWER = Problem("t/3", "Solve x^2 = 1.", ["1", "-1"], "t", {"solution": "  "})


def test_hint_from_a_record_with_and_without_a_solution():
    assert privileged_hint(WITH_SOLUTION) == "2 + 3 = 5. \\boxed{5}"
    assert privileged_hint(WITHOUT) == "The final answer is 3."
    assert privileged_hint(LIST_ANSWER) == "The final answer is 1, -1."  # a blank solution is no solution
    assert privileged_hint(WITHOUT, "Answer: {answer}") == "Answer: 3"


def test_teacher_prompt_text():
    # plain frame (no tokenizer), no instruction template: the exact string, braces left alone
    got = teacher_prompt(WITH_SOLUTION, None, template="none", hint_template="reference")
    assert got == ("User: Compute {x} if x = 2 + 3.\n\nHere is a reference solution to this problem:\n"
                   "2 + 3 = 5. \\boxed{5}\n\nUsing it as a guide, solve the problem step by step in your own words."
                   "\nAssistant:")
    got = teacher_prompt(WITHOUT, None, template="boxed", hint_template="{hint} -- {question}")
    assert got == ("User: The final answer is 3. -- Compute 7 - 4.\n\nPlease reason step by step, "
                   "and put your final answer within \\boxed{}.\nAssistant:")
    # a hint that itself contains "{question}" is not expanded a second time
    tricky = Problem("t/4", "Q?", "1", "t", {"solution": "see {question}"})
    assert teacher_prompt(tricky, None, template="none", hint_template="{question}|{hint}") == \
        "User: Q?|see {question}\nAssistant:"
    for bad in ("{question} only", "no placeholders", "{hint}"):
        with pytest.raises(ValueError, match="distill.hint_template"):
            teacher_prompt(WITHOUT, None, hint_template=bad)
    with pytest.raises(ValueError, match="distill.answer_template"):
        teacher_prompt(WITHOUT, None, answer_template="no slot")
    with pytest.raises(TypeError, match="Problem"):
        teacher_prompt("Compute 1 + 1.", None)


def test_bad_templates_fail_at_config_time():
    from stapo.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="distill.hint_template"):
        build_config(None, ["objective.name=dasd", "distill.hint_template=no placeholders"])
    with pytest.raises(ConfigError, match="distill.answer_template"):
        build_config(None, ["objective.name=opsd", "distill.answer_template=no slot"])
    build_config(None, ["objective.name=grpo", "distill.hint_template=unused"])  # only read by the distill objectives


def test_demo_template_on_the_demo_tokenizer():
    """The demo's hint template survives its tiny tokenizer; the English one loses letters (why 'demo' exists)."""
    from stapo.demo.assets import BaseModelSettings, build_tokenizer
    from stapo.demo.task import make_problems

    tok = build_tokenizer(BaseModelSettings(tokenizer_problems=300))
    p = make_problems(1, seed=5, split="heldout")[0]
    student = build_prompt(p, tok, template="none")
    teacher = teacher_prompt(p, tok, template="none", hint_template="demo")
    assert teacher == f"Question: {p.prompt}\nAnswer: {p.meta['solution']}\nQuestion: {p.prompt}\nAnswer: "
    assert teacher.endswith(student)  # the same question and generation prompt, with the solved turn before it
    assert tok.decode(tok(teacher, add_special_tokens=False)["input_ids"]) == teacher
    english = teacher_prompt(p, tok, template="none", hint_template="reference")
    assert tok.decode(tok(english, add_special_tokens=False)["input_ids"]) != english
    assert set(HINT_TEMPLATES) >= {"reference", "demo"}


# --- the teacher pass on a real tiny model ---------------------------------------------------------

def tiny_train_cfg(model_dir, tmp_path, *extra):
    from stapo.config import build_config

    return build_config(None, [
        f"model.name_or_path={model_dir}", f"output_dir={tmp_path}", "run_name=run",
        "reward.name=helpers.rewards:digit_reward", "reward.num_workers=1",
        "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
        "optim.mini_batch_prompts=4", "optim.micro_batch_size=3", "optim.lr=1e-3",
        "data.heldout_size=4", "eval_every=0", "save_every=100", "threads=1", *extra,
    ])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stapo.demo.task import make_problems

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = make_problems(3, seed=1) + [Problem("x/1", "Compute 12 + 30.", "42", "x", {})]  # one without
    prompts = [tok(build_prompt(p, tok, template="none"), add_special_tokens=False)["input_ids"] for p in problems]
    # "rollouts": real token sequences of different lengths (one truncated), two per prompt
    gens = []
    for i, p in enumerate(problems):
        text = p.meta.get("solution", "12 + 30 = 42. \\boxed{42}")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        gens.append([Generation(ids[: 4 + i] + [tok.eos_token_id], None, "stop"), Generation(ids[:9], None, "length")])
    batch = collate_rollouts(problems, prompts, gens, tok.pad_token_id)
    batch.advantages = torch.tensor([1.0, -1.0] * 4)
    return model, tok, batch


def test_teacher_pass_is_aligned_and_gets_no_gradient(tiny, tiny_model_dir, tmp_path):
    from stapo.trainer.phases import compute_old_logprobs

    model, tok, batch = tiny
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    cfg = tiny_train_cfg(tiny_model_dir, tmp_path, "rollout.temperature=0.7")
    batch = batch.with_rollout_stats(compute_old_logprobs(model, batch, 0.7, 3, torch.device("cpu"),
                                                          with_collision=False))
    with torch.enable_grad():
        tl = compute_teacher_logprobs(model, batch, tok, cfg, torch.device("cpu"))
    assert tl.shape == batch.response_ids.shape and tl.dtype == torch.float32
    assert not tl.requires_grad and tl.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    # alignment: position t is log π(y_t | teacher prompt, y_<t) at T = 0.7, from a plain unpadded forward
    ids = teacher_prompt_ids(batch.problems, tok, template="none", hint_template="demo")
    for b in range(len(batch)):
        n = int(batch.response_lengths[b])
        resp = batch.response_ids[b, :n]
        seq = torch.cat([torch.tensor(ids[b]), resp])[None]
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(ids[b]) - 1: -1] / 0.7  # [n, V]
        want = torch.log_softmax(logits.double(), -1).gather(-1, resp[:, None]).squeeze(-1)
        torch.testing.assert_close(tl[b, :n].double(), want, rtol=1e-4, atol=1e-4)
    # the privileged context changes the scores: the teacher is not the student
    valid = batch.response_mask
    assert (tl[valid] - batch.old_logprobs[valid]).abs().max() > 1e-3
    # the record without a solution gets the answer sentence (text level: this tokenizer lacks letters)
    assert "Answer: The final answer is 42.\nQuestion" in teacher_prompt(batch.problems[-1], tok, template="none",
                                                                         hint_template="demo")


def test_update_is_micro_batch_invariant_on_a_real_model(tiny, tiny_model_dir, tmp_path):
    """update_policy with micro-batches of 8 (one) and 3: the same weights after the step."""
    from stapo.trainer.phases import compute_old_logprobs, update_policy

    model, tok, batch = tiny
    results = []
    for micro in (8, 3):
        cfg = tiny_train_cfg(tiny_model_dir, tmp_path, "objective.name=dasd", f"optim.micro_batch_size={micro}",
                             "objective.options={beta: 1.0}", "rollout.n=2", "optim.mini_batch_prompts=4")
        m = copy.deepcopy(model)
        b = batch.with_rollout_stats(compute_old_logprobs(m, batch, 1.0, micro, torch.device("cpu"),
                                                          with_collision=False))
        b = dataclasses.replace(b, teacher_logprobs=compute_teacher_logprobs(m, b, tok, cfg, torch.device("cpu")))
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        metrics = update_policy(m, opt, b, cfg, torch.device("cpu"), params_fresh=True,
                                objective=objective_from_config(cfg)).metrics
        assert metrics["train/optimizer_steps"] == 1
        results.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
    moved = (results[0] - torch.cat([p.detach().reshape(-1) for p in model.parameters()])).abs().max()
    assert moved > 1e-4
    # fp32 sums in another order: equal to ~1e-6 of the step, far below the step itself
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5 * float(moved))


def test_one_dasd_training_step_logs_distill_metrics(tiny_model_dir, tmp_path):
    from stapo.trainer.loop import train

    run_dir = train(tiny_train_cfg(tiny_model_dir, tmp_path, "objective.name=dasd", "steps=1"), quiet=True)
    step = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert step["train/optimizer_steps"] == 1 and step["actor/grad_norm"] > 0
    assert 0.0 < step["distill/attract_fraction"] < 1.0 and 0.0 < step["distill/repel_fraction"] < 0.5
    assert step["distill/attract_fraction"] + step["distill/repel_fraction"] <= 1.0
    assert step["distill/kl_teacher"] > 0 and abs(step["distill/delta_bar_mean"]) < 1e-5  # one mini-batch
