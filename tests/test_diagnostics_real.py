"""Token diagnostics on a real tiny Qwen3 and its own samples: the theory checks of the issue, the
rollout dumps, and `stapo analyze` on a run directory written by a short real GRPO loop."""

import copy
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from stapo.advantages import group_advantages
from stapo.cli import main
from stapo.data.problem import Problem
from stapo.diagnostics import (
    DiagnosticsAccumulator,
    diagnostic_entropy_threshold,
    dump_rollouts,
    list_dumps,
    logit_stats,
    read_rollouts,
    theory_check,
)
from stapo.models.tiny import tiny_model_and_tokenizer
from stapo.objectives import policy_loss, s2t_mask
from stapo.rollout import HFGenerator, SamplingConfig, collate_rollouts

GROUP = 4


def _problem(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return Problem(f"add/{a}+{b}", f"Question: What is {a} + {b}?\nAnswer:", str(a + b), "add")


def _solution(p: Problem) -> str:
    q = p.prompt.split("is ")[1].split("?")[0]
    return f"{p.prompt} {q} = {p.answer}. The answer is {p.answer}."


def _reward(p: Problem, text: str) -> float:
    """0.5 for ending in "The answer is <integer>." and 0.5 more if the integer is right."""
    m = re.search(r"The answer is (\d+)\.$", text.strip())
    return 0.0 if m is None else 0.5 + 0.5 * (m.group(1) == p.answer)


@pytest.fixture(scope="module")
def tiny():
    """A tiny Qwen3 briefly fitted to addition texts, so its distributions are far from uniform."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the box is shared: two threads contend and run ~10x slower
    rng = random.Random(0)
    texts = [_solution(_problem(rng)) for _ in range(200)]
    model, tok = tiny_model_and_tokenizer(texts, vocab_size=96)
    enc = [tok(t + tok.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(20):
        rows = rng.sample(enc, 8)
        width = max(map(len, rows))
        ids = torch.full((8, width), tok.pad_token_id)
        mask = torch.zeros(8, width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    yield model, tok
    torch.set_num_threads(threads)


def test_theory_on_real_rollouts(tiny):
    model, tok = tiny
    rng = random.Random(1)
    prompts = [_problem(rng).prompt for _ in range(6)]
    r = theory_check(model, tok, prompts, samples_per_prompt=4, max_new_tokens=24, n_tokens=400,
                     n_model_tokens=48, seed=0)
    print("\n" + r["markdown"])
    assert r["n_tokens"] >= 300
    assert r["grad_norm_max_rel_err"] <= 1e-5
    assert r["lower_bound_violations"] == 0 and r["upper_bound_violations"] == 0
    assert r["logit_exact_agreement"] >= 0.99
    # the paper's criterion is exactly the first-order change of the natural-gradient step
    assert r["natural_paper_agreement"] >= 0.99
    # through the whole model the logit-level forms are approximations; a sign error would sit near 0%
    assert r["model_exact_agreement"] > 0.5 and r["model_paper_agreement"] > 0.5
    assert 0.0 < r["entropy_up_measured_fraction"] < 1.0  # both directions occur in real data


def _grpo_run(model, tok, run_dir, steps=3, prompts_per_step=6, micro=12):
    """A short real GRPO loop that logs diag/* metrics and dumps every step, as the trainer does."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = HFGenerator(model, tok)
    rng = random.Random(2)
    (run_dir / "config.yaml").write_text("objective:\n  name: grpo\n")
    for step in range(1, steps + 1):
        problems = [_problem(rng) for _ in range(prompts_per_step)]
        prompt_ids = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
        gens = gen.generate(prompt_ids, SamplingConfig(max_new_tokens=20, n=GROUP, seed=step))
        batch = collate_rollouts(problems, prompt_ids, gens, tok.pad_token_id)
        batch.rewards = torch.tensor([_reward(p, t) for p, t in zip(batch.problems, batch.response_texts)])
        batch.advantages = group_advantages(batch.rewards, GROUP)
        lp_len, t_len = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = logits[:, lp_len - 1 : lp_len - 1 + t_len]  # [B, T, V]: position t predicts token t
        st = logit_stats(logits, batch.response_ids, chunk_size=64)
        batch.old_logprobs = st.logprobs
        # diagnostics over micro-batches with the mini-batch-wide τ_h, as the trainer would
        pieces = [(slice(i, i + micro)) for i in range(0, len(batch), micro)]
        tau = diagnostic_entropy_threshold(
            [(st.logprobs[s], st.entropy[s], batch.advantages[s], batch.response_mask[s]) for s in pieces])
        acc = DiagnosticsAccumulator()
        for s in pieces:
            acc.add(st.logprobs[s], st.entropy[s], st.collision[s], batch.advantages[s], batch.old_logprobs[s],
                    batch.response_mask[s], vocab_size=logits.shape[-1], entropy_threshold=tau,
                    p2logp=st.p2logp[s])
        logprobs = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None])[..., 0]
        loss, m = policy_loss("grpo", logprobs, batch.old_logprobs, batch.advantages, batch.response_mask,
                              entropy=st.entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"step": step, "reward/mean": float(batch.rewards.mean()),
               **{k: float(v) for k, v in m.items()}, **acc.finalize()}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        dump_rollouts(run_dir, batch, step=step, logprobs=st.logprobs, entropy=st.entropy,
                      collision=st.collision, tokenizer=tok, p2logp=st.p2logp, entropy_threshold=tau)
        yield batch, st, tau


def test_dumps_and_analyze_on_a_real_grpo_run(tiny, tmp_path):
    base, tok = tiny
    model = copy.deepcopy(base)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    silenced_total = 0
    for batch, st, tau in _grpo_run(model, tok, run_dir):
        step = len(list_dumps(run_dir))
        table = pq.read_table(run_dir / "rollouts" / f"step_{step:06d}.parquet")
        d = table.to_pydict()
        meta = json.loads(table.schema.metadata[b"stapo"])
        assert batch.advantages.gt(0).any(), f"rewards {batch.rewards.tolist()} give no positive advantage"
        assert meta["entropy_threshold"] == pytest.approx(tau)
        # one row per generated token, pieces re-assemble each response
        assert table.num_rows == int(batch.response_mask.sum())
        for seq, (ids, mask) in enumerate(zip(batch.response_ids, batch.response_mask)):
            joined = "".join(pc for s, pc in zip(d["seq"], d["piece"]) if s == seq)
            assert joined == tok.decode(ids[mask].tolist(), skip_special_tokens=False)
        # what STAPO would have silenced on this GRPO step, with the step's τ_h
        want = s2t_mask(st.logprobs, st.entropy, batch.advantages, batch.response_mask, entropy_threshold=tau)
        got = torch.zeros_like(want)
        got[d["seq"], d["pos"]] = torch.tensor(d["silenced"])
        assert torch.equal(got, want)
        assert all(q == "low_p_low_h" for q, s in zip(d["quadrant"], d["silenced"]) if s)
        assert all((q is not None) == (v and a > 0) for q, v, a in zip(d["quadrant"], d["valid"], d["advantage"]))
        torch.testing.assert_close(torch.tensor(d["p"]), torch.tensor(d["logprob"]).exp())
        silenced_total += sum(d["silenced"])
    assert silenced_total > 0, "the run should contain spurious tokens for the report to show"

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert sum(r[f"diag/quadrant/{q}/fraction"] for q in
                   ("low_p_low_h", "low_p_high_h", "high_p_low_h", "high_p_high_h")) == pytest.approx(1.0)
        assert r["diag/bounds/violations"] == 0 and "diag/entropy_up/exact_fraction" in r

    assert main(["analyze", str(run_dir)]) == 0
    report = (run_dir / "analysis" / "report.md").read_text()
    for png in ("scatter_p_h.png", "quadrants.png", "grad_norm_hist.png", "entropy.png"):
        assert f"]({png})" in report
        assert (run_dir / "analysis" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "objective `grpo`" in report
    # the most silenced token of the dumps heads the table
    all_rows = read_rollouts(run_dir).to_pydict()
    counts = {}
    for tid, s in zip(all_rows["token_id"], all_rows["silenced"]):
        counts[tid] = counts.get(tid, 0) + int(s)
    top = max(counts.values())
    table_lines = [ln for ln in report.splitlines() if ln.startswith("| `") and "⟦" in ln]
    assert table_lines and f"| {top} |" in table_lines[0]

    # --theory-check loads the run's saved model and takes prompts from the last dump
    model.save_pretrained(run_dir / "checkpoints" / "step_3")
    tok.save_pretrained(run_dir / "checkpoints" / "step_3")
    assert main(["analyze", str(run_dir), "--theory-check", "--theory-tokens", "150",
                 "--theory-model-tokens", "8", "--theory-prompts", "3"]) == 0
    report = (run_dir / "analysis" / "report.md").read_text()
    assert "## Theory check on this model" in report and "checkpoints/step_3" in report


def test_analyze_errors_name_the_path(tmp_path, capsys):
    # a user error: one line on stderr and exit status 2 (``stapo --debug`` raises instead)
    assert main(["analyze", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "actor/entropy": 1.0}\n')
    assert main(["analyze", str(tmp_path), "--theory-check"]) == 2
    assert "no saved model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no saved model"):
        main(["--debug", "analyze", str(tmp_path), "--theory-check"])


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
       "STAPO_PROGRESS_EVERY": "0"}


def _analyze(*args):
    """`stapo analyze` as a user runs it, its stderr a pipe."""
    return subprocess.run([sys.executable, "-m", "stapo", "analyze", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)


def test_theory_check_on_a_lora_run_shows_its_phases_in_a_pipe(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, tok = tiny
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for _ in _grpo_run(copy.deepcopy(base), tok, run_dir, steps=1, prompts_per_step=2):
        pass
    # a LoRA run's checkpoint as the trainer saves it: the adapter and the tokenizer, the base elsewhere
    base.save_pretrained(tmp_path / "base")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    policy = run_dir / "checkpoints" / "step_000001" / "policy"
    lora.save_pretrained(policy)
    tok.save_pretrained(policy)
    assert not (policy / "config.json").exists() and (policy / "adapter_config.json").exists()

    done = _analyze(run_dir, "--theory-check", "--theory-tokens", "40", "--theory-model-tokens", "3",
                    "--theory-prompts", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"stapo analyze: loading {policy}"
    assert lines[1].startswith("stapo analyze: theory check: sampling 4 responses to each of 2 prompts")
    assert lines[2].startswith("stapo analyze: theory check: float64 logits of 8 sequences")
    assert lines[3].startswith("stapo analyze: theory check: whole-model steps: 1/3 tokens (33%), ")
    assert re.fullmatch(r"stapo analyze: theory check: whole-model steps: 3/3 tokens, done in \d+:\d\d", lines[5])
    assert lines[6] == f"stapo analyze: reading {run_dir / 'metrics.jsonl'} and the rollout dumps"
    assert lines[7] == f"stapo analyze: plotting 1 logged steps and 1 dumps into {run_dir / 'analysis'}"
    assert len(lines) == 8
    report = (run_dir / "analysis" / "report.md").read_text()
    assert "## Theory check on this model" in report and f"Model: `{policy}`" in report

    quiet = _analyze(run_dir, "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == f"wrote {run_dir / 'analysis' / 'report.md'}\n"


def test_a_run_without_dumps_names_dump_every(tiny, tmp_path):
    base, tok = tiny
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "actor/entropy": 1.0}\n')
    done = _analyze(tmp_path, "--quiet")
    assert done.returncode == 0
    assert done.stderr == (f"stapo analyze: note: {tmp_path} has no rollout dumps, so the token plots are empty; "
                           "set diagnostics.dump_every=N in the training config to dump rollouts every N steps\n")
    base.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    refused = _analyze(tmp_path, "--theory-check", "-q")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "set diagnostics.dump_every=N" in refused.stderr
