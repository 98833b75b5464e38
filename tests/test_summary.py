"""The end-of-run summary reads the right metrics for every objective."""

import json

import pytest

from stapo.trainer.summary import run_summary


def _write(tmp_path, rows):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_summary_uses_update_entropy_and_falls_back_to_rollout_entropy(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.25, "eval/greedy_accuracy": 0.5}]
    rows += [{"step": s, "diag/entropy/mean": 0.2, "time/step": 1.0} for s in range(1, 21)]
    rows.append({"step": 20, "eval/accuracy": 0.5, "eval/greedy_accuracy": 0.75})
    s = run_summary(_write(tmp_path, rows))
    # justrl / grpo log no actor/entropy: the rollout policy's entropy from the diagnostics stands in
    assert s["entropy_final"] == pytest.approx(0.2)
    assert (s["accuracy_before"], s["accuracy_after"], s["steps"]) == (0.25, 0.5, 20)
    assert s["masked_fraction"] is None and s["train_time_s"] == 20.0

    rows = [{**r, "actor/entropy": 0.1, "s2t/masked_fraction": 1e-4} if "diag/entropy/mean" in r else r for r in rows]
    s = run_summary(_write(tmp_path, rows))
    assert s["entropy_final"] == pytest.approx(0.1) and s["masked_fraction"] == pytest.approx(1e-4)


def test_summary_whole_run_silenced(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.2}]
    rows += [{"step": i, "s2t/masked_fraction": 1e-4 if i == 1 else 0.0, "s2t/silenced": 1.0 if i == 1 else 0.0}
             for i in range(1, 21)]
    s = run_summary(_write(tmp_path, rows))
    assert s["masked_fraction"] == 0.0  # the last 10 steps silenced nothing
    assert abs(s["masked_fraction_run"] - 1e-4 / 20) < 1e-15 and s["silenced_tokens"] == 1.0
