"""examples/trl_stapo.py end to end on CPU: a tiny local Qwen3 saved to disk, a verl-schema parquet
written by stapo, the real `math` reward (math-verify in RewardPool workers), 2 optimizer steps."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from stapo.data import Problem, write_verl_parquet
from trl_common import tiny_model_and_tok

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "trl_stapo.py"


def _example():
    spec = importlib.util.spec_from_file_location("trl_stapo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_math_reward_adapter_scores_verl_rows():
    from stapo.rewards import RewardPool

    with RewardPool("math", num_workers=1, timeout=5.0) as pool:
        reward = _example().MathReward(pool)
        completions = [[{"role": "assistant", "content": "so \\boxed{4}"}], [{"role": "assistant", "content": "5"}],
                       "text completion: \\boxed{\\frac{1}{2}}"]
        gold = [{"style": "rule", "ground_truth": "4"}, {"style": "rule", "ground_truth": "4"},
                {"style": "rule", "ground_truth": "0.5"}]
        assert reward(prompts=["p"] * 3, completions=completions, reward_model=gold) == [1.0, 0.0, 1.0]


def test_example_trains_on_a_verl_parquet(tmp_path):
    model, tok = tiny_model_and_tok()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    problems = [Problem(id=f"t/{i}", prompt=f"{i}+{i}", answer=str(2 * i), source="toy") for i in range(4)]
    data = write_verl_parquet(problems, tmp_path / "train.parquet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logs = _example().main([
            "--model", str(tmp_path / "model"), "--data", str(data), "--output-dir", str(tmp_path / "out"),
            "--cpu", "--precision", "fp32", "--no-gradient-checkpointing", "--max-steps", "2",
            "--per-device-batch", "4", "--grad-accum", "2", "--num-generations", "4",
            "--max-completion-length", "8", "--learning-rate", "1e-3", "--reward-workers", "1",
            "--s2t-prob-threshold", "0.02",
        ])
    finally:
        torch.set_num_threads(threads)
    steps = [h for h in logs if "loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert {"rewards/math/mean", "s2t/masked_fraction", "s2t/candidates", "s2t/entropy_threshold"} <= set(h)
    assert (tmp_path / "out" / "config.json").is_file()


def test_example_rejects_a_parquet_without_verl_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["1+1"], "answer": ["2"]}), tmp_path / "bad.parquet")
    with pytest.raises(SystemExit, match=r"not verl's schema, missing column\(s\) \['prompt', 'reward_model'\]"):
        _example().load_verl_dataset(str(tmp_path / "bad.parquet"))
