"""The trainer on a tiny real model: one step per objective, resume, checkpoints, faults, config."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from stapo.config import ConfigError, build_config
from stapo.objectives import OBJECTIVES
from stapo.objectives.training import objective_from_config
from stapo.trainer.checkpoint import checkpoint_dirs, latest_checkpoint
from stapo.trainer.loop import train

TIMING_KEYS = ("time/", "perf/", "reward/seconds")


def tiny_cfg(model_dir, tmp_path, *extra):
    return build_config(None, [
        f"model.name_or_path={model_dir}", f"output_dir={tmp_path}", "run_name=run",
        "reward.name=helpers.rewards:digit_reward", "reward.num_workers=1",
        "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
        "optim.mini_batch_prompts=2", "optim.micro_batch_size=3", "optim.lr=1e-3",
        "data.heldout_size=4", "eval_every=0", "save_every=100", "threads=1", *extra,
    ])


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(record):
    return {k: v for k, v in record.items() if not k.startswith(TIMING_KEYS)}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_one_train_step_per_objective(objective, tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, f"objective.name={objective}", "steps=1",
                   "objective.options={}" if objective != "stapo" else "objective.options={prob_threshold: 0.5}")
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    run_dir = train(cfg, quiet=True)
    step = rows(run_dir)[-1]
    assert step["step"] == 1
    # P=4 prompts, M=2 per optimizer step -> exactly 2 optimizer steps, none skipped
    assert step["train/optimizer_steps"] == 2 and step["train/nonfinite_skipped"] == 0
    assert 0.0 < step["reward/mean"] < 1.0, "the digit reward gives mixed groups on a random model"
    assert step["actor/grad_norm"] > 0
    after = AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir) / "policy").state_dict()
    moved = max(float((after[k] - before[k]).abs().max()) for k in after)
    assert moved > 1e-5, "the optimizer step changed no weight"
    if objective == "stapo":
        assert step["s2t/candidates"] > 0 and 0 < step["s2t/masked_fraction"] < 1
    if objective == "entropy20":
        assert 0.15 < step["entropy20/kept_fraction"] < 0.5


def test_resume_is_exact(tiny_model_dir, tmp_path):
    straight = train(tiny_cfg(tiny_model_dir, tmp_path / "a", "steps=6", "save_every=3"), quiet=True)
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "b", "steps=3", "save_every=3")
    first = train(cfg, quiet=True)
    resumed = train(dataclasses.replace(cfg, steps=6), resume=first, quiet=True)
    a, b = rows(straight), rows(resumed)
    assert [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a, b):
        if ra["step"] == 3:  # the 3-step run evaluated at its last step; the 6-step run did not
            rb = {k: v for k, v in rb.items() if not k.startswith("eval/")}
        assert without_timing(ra) == without_timing(rb), f"step {ra['step']} differs after resume"
    assert "eval/accuracy" in a[-1] and a[-1]["eval/accuracy"] == b[-1]["eval/accuracy"]


def test_checkpoint_survives_a_crash_mid_save(tiny_model_dir, tmp_path):
    run_dir = train(tiny_cfg(tiny_model_dir, tmp_path, "steps=1", "save_every=1"), quiet=True)
    good = latest_checkpoint(run_dir)
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from stapo.trainer.checkpoint import save_checkpoint
        model = AutoModelForCausalLM.from_pretrained({str(good / "policy")!r})
        opt = torch.optim.AdamW(model.parameters())
        save_checkpoint({str(run_dir)!r}, 2, model, None, opt, None, {{}}, keep_last=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False,
                          env={"STAPO_CHECKPOINT_FAULT": "after_policy", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 17, "the simulated crash did not happen"
    assert checkpoint_dirs(run_dir) == [good], "a half-written checkpoint became visible"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(good / "policy")  # the previous one still loads
    assert (good / "trainer_state" / "state.json").is_file()


def test_reward_worker_timeout_inside_a_train_step(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "steps=1", "reward.name=helpers.rewards:sleepy_reward",
                   "reward.timeout=0.5", "rollout.max_new_tokens=12", "data.heldout=null")
    run_dir = train(cfg, quiet=True)
    step = rows(run_dir)[-1]
    assert step["reward/timeouts"] > 0, "no response hit the hanging branch"
    assert step["train/optimizer_steps"] == 2


def test_gradient_accumulation_matches_whole_minibatch(tiny_model_dir):
    """One mini-batch, whole vs split in micro-batches: same update (SGD makes update = −lr·grad)."""
    from transformers import AutoModelForCausalLM

    from stapo.rollout import HFGenerator, SamplingConfig, collate_rollouts
    from stapo.trainer.phases import attach_advantages, compute_old_logprobs, update_policy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(f"Compute {a} + {b}.")["input_ids"] for a, b in [(1, 2), (30, 4), (55, 61)]]
    gens = HFGenerator(model, tok).generate(prompts, SamplingConfig(max_new_tokens=10, n=4, seed=3))
    batch = collate_rollouts(["a", "b", "c"], prompts, gens, tok.pad_token_id)
    batch.rewards = torch.tensor([float(len(t) % 3 == 0) for t in batch.response_texts])
    batch = attach_advantages(batch, 4, "grpo")
    for name, options in [("stapo", {"prob_threshold": 0.3}), ("entropy20", {}), ("grpo", {}), ("dr_grpo", {})]:
        results = []
        for micro in (12, 5, 1):
            cfg = build_config(None, [f"objective.name={name}", "rollout.prompts_per_step=3", "rollout.n=4",
                                      "optim.mini_batch_prompts=3", f"optim.micro_batch_size={micro}",
                                      "optim.grad_clip=1e9"])
            cfg.objective.options.update(options)
            m = copy.deepcopy(model)
            batch = batch.with_rollout_stats(compute_old_logprobs(m, batch, 1.0, 4, "cpu",
                                                                  with_collision=False))
            opt = torch.optim.SGD(m.parameters(), lr=1.0)
            update_policy(m, opt, batch, cfg, "cpu", params_fresh=False, objective=objective_from_config(cfg))
            results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
        base = torch.cat([p.detach().flatten() for p in model.parameters()])
        whole = results[0] - base
        assert whole.abs().max() > 0
        for split in results[1:]:
            rel = (split - base - whole).norm() / whole.norm()
            assert rel < 1e-6, f"{name}: accumulated update differs from whole-batch update by {rel:.2e}"


def test_config_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="rollout.nn"):
        build_config(None, ["rollout.nn=4"])
    with pytest.raises(ConfigError, match="'rollout.n' must be int"):
        build_config(None, ["rollout.n=four"])
    with pytest.raises(ConfigError, match="'rollout.backend' must be one of 'hf', 'vllm'"):
        build_config(None, ["rollout.backend=sglang"])
    with pytest.raises(ConfigError, match="objective.name.*stapo"):
        build_config(None, ["objective.name=ppo2"])
    with pytest.raises(ConfigError, match="prob_treshold"):
        build_config(None, ["objective.options={prob_treshold: 0.1}"])
    with pytest.raises(ConfigError, match="multiple of optim.mini_batch_prompts"):
        build_config(None, ["rollout.prompts_per_step=10", "optim.mini_batch_prompts=4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config(str(bad))
    cfg = build_config(None, ["optim.lr=1e-6", "preset=dr_grpo"])  # YAML reads 1e-6 as a string
    assert cfg.optim.lr == 1e-6 and cfg.objective.advantage == "dr_grpo"


def test_cli_reports_config_errors():
    proc = subprocess.run([sys.executable, "-m", "stapo", "train", "rollout.n=x"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "rollout.n" in proc.stderr and "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "stapo", "train", "--help"], capture_output=True, text=True,
                               check=True)
    assert "--resume" in help_text.stdout and "objective.name" in help_text.stdout


def test_overrides_never_leak_into_the_builtin_defaults():
    build_config(None, ["objective.name=grpo", "rollout.n=3"])
    cfg = build_config(None, [])
    assert cfg.objective.name == "stapo" and cfg.rollout.n == 8
