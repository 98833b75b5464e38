"""End-to-end `stapo eval` on a tiny random Qwen3 saved to disk, on CPU, through the real CLI.

Accuracies of a random model are ~0, so the checks are on the outputs: files, counts, the
consistency of the metrics with samples.jsonl, and resume after a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stapo.cli import main
from stapo.eval.metrics import k_ladder
from stapo.eval.settings import DEFAULT_SAMPLES, PAPER_BENCHMARKS

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("STAPO_DATA_DIR", ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "benchmarks").is_dir(), reason=f"no benchmark data at {DATA_DIR}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 + a tokenizer trained on the benchmarks' own text, saved like a real checkpoint."""
    from stapo.data import apply_template, load_benchmark
    from stapo.models.tiny import tiny_model_and_tokenizer

    # A 2000-token BPE over the templated questions keeps prompts short (~125 tokens) and hidden 64
    # keeps the FLOPs per token low: prefill of 324 prompts is most of the CPU time of the e2e test.
    texts = [
        apply_template(p.prompt) for b in PAPER_BENCHMARKS for p in load_benchmark(b, data_dir=DATA_DIR)[:200]
    ]
    texts += ["\\boxed{12}", "The answer is \\boxed{3/4}."]
    model, tok = tiny_model_and_tokenizer(
        texts,
        vocab_size=2000,
        max_position_embeddings=2048,
        hidden_size=64,
        num_heads=2,
        intermediate_size=128,
    )
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _eval_args(model_dir, out, *extra, max_new_tokens=16):
    return [
        "eval",
        "--model",
        str(model_dir),
        "--data-dir",
        str(DATA_DIR),
        "--out",
        str(out),
        "--max-new-tokens",
        str(max_new_tokens),
        "--no-progress",
        "--reward-workers",
        "1",
        *extra,
    ]


def _read_samples(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_eval_all_six_benchmarks_limit_3(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_eval_args(model_dir, out, "--limit", "3", max_new_tokens=8)) == 0
    printed = capsys.readouterr().out
    assert "| Model | AIME24 (avg@32) | AIME25 (avg@32) | AMC23 (avg@32) | MATH500 (avg@4) |" in printed
    assert "Minerva (avg@4) | Olympiad (avg@4) | Avg. |" in printed

    results = json.loads((out / "results.json").read_text())
    samples = _read_samples(out / "samples.jsonl")
    assert list(results["benchmarks"]) == list(PAPER_BENCHMARKS)
    assert len(samples) == sum(3 * DEFAULT_SAMPLES[b] for b in PAPER_BENCHMARKS)  # 3·(3·32 + 3·4) = 324
    assert len({(s["benchmark"], s["problem_index"], s["sample_index"]) for s in samples}) == len(samples)
    for field in ("prompt", "response", "answer", "correct", "num_tokens", "gold", "finish_reason"):
        assert all(field in s for s in samples), field
    assert all(0 < s["num_tokens"] <= 8 for s in samples)
    assert all(
        s["finish_reason"] == "stop" or s["num_tokens"] == 8 for s in samples
    )  # "length" = hit the cap
    for b, m in results["benchmarks"].items():
        n = DEFAULT_SAMPLES[b]
        rows = [s for s in samples if s["benchmark"] == b]
        assert m["n_samples"] == n and m["n_problems"] == 3 and len(rows) == 3 * n
        assert list(m["pass_at_k"]) == [str(k) for k in k_ladder(n)] == list(m["maj_at_k"])
        assert m["avg"] == m["pass_at_k"]["1"]  # avg@N is pass@1 (same estimator, same samples)
        assert m["avg"] == pytest.approx(sum(s["correct"] for s in rows) / len(rows))  # equal-N problems
        assert all(0.0 <= v <= 1.0 for v in [*m["pass_at_k"].values(), *m["maj_at_k"].values()])
        assert m["mean_tokens"] == pytest.approx(sum(s["num_tokens"] for s in rows) / len(rows))
        assert (out / f"plot_{b}.png").stat().st_size > 1000
    assert results["macro"]["avg"] == pytest.approx(sum(m["avg"] for m in results["benchmarks"].values()) / 6)
    assert (out / "results.md").exists()


COMMON = ["--benchmarks", "amc23,math500", "--limit", "4", "--samples", "amc23=4", "--batch-size", "4"]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(model_dir, tmp_path, capsys):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    total = 4 * 4 + 4 * 4  # 8 chunks (batch 4 rows = one problem x 4 samples), so a kill lands mid-run
    proc = subprocess.Popen(
        [sys.executable, "-m", "stapo", *_eval_args(model_dir, killed, *COMMON)],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    path, deadline, kept = killed / "samples.jsonl", time.monotonic() + 120, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= 1:
            os.killpg(proc.pid, signal.SIGKILL)  # the eval and its reward workers, mid-run
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    before = path.read_bytes()
    kept = before.count(b"\n")
    assert 0 < kept < total and not (killed / "results.json").exists()

    assert main(_eval_args(model_dir, killed, *COMMON)) == 0  # resume
    # only the chunks (4 rows each) not yet complete were generated again
    assert json.loads((killed / "timing.json").read_text())["samples"] == total - 4 * (kept // 4)
    assert main(_eval_args(model_dir, clean, *COMMON)) == 0  # uninterrupted, same seed
    resumed = (killed / "samples.jsonl").read_bytes()
    assert resumed.startswith(before[: before.rfind(b"\n") + 1])  # finished samples kept, not redone
    assert resumed.count(b"\n") == total  # nothing duplicated, nothing missing

    def by_key(p):
        return {(s["benchmark"], s["problem_index"], s["sample_index"]): s for s in _read_samples(p)}

    assert by_key(killed / "samples.jsonl") == by_key(clean / "samples.jsonl")
    assert json.loads((killed / "results.json").read_text()) == json.loads(
        (clean / "results.json").read_text()
    )

    # resuming into the same directory with other settings is refused, naming what changed
    capsys.readouterr()
    assert main(_eval_args(model_dir, killed, *COMMON, "--seed", "1")) == 2
    assert "holds samples from other settings (seed: 0 -> 1)" in capsys.readouterr().err


def test_checkpoints_of_a_run_then_compare(model_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(model_dir, run / "checkpoints" / f"step_{step:06d}" / "policy")
    (run / "config.yaml").write_text("seed: 0\n")
    args = [
        "eval",
        "--run",
        str(run),
        "--data-dir",
        str(DATA_DIR),
        "--benchmarks",
        "math500,aime24",
        "--limit",
        "2",
        "--samples",
        "aime24=2,math500=2",
        "--max-new-tokens",
        "8",
        "--no-progress",
        "--reward-workers",
        "1",
    ]
    assert main([*args, "--every", "4"]) == 0
    assert [p.name for p in sorted((run / "eval").glob("step_*"))] == ["step_000004"]
    assert main(args) == 0  # step 4 is reused, step 2 evaluated
    printed = capsys.readouterr().out
    assert "| step 2 |" in printed and "| step 4 |" in printed
    assert (run / "eval" / "accuracy_vs_step.png").stat().st_size > 1000
    r2 = json.loads((run / "eval" / "step_000002" / "results.json").read_text())
    r4 = json.loads((run / "eval" / "step_000004" / "results.json").read_text())
    assert r2["benchmarks"] == r4["benchmarks"]  # same weights, same seed -> same samples and metrics

    assert main(["eval", "--compare", str(run / "eval" / "step_000002"), str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| Model | MATH500 (avg@2) | AIME24 (avg@2) | Avg. |"
    assert table[2].startswith("| step_000002 |") and table[3].startswith("| run@4 |")


def test_vllm_backend_without_vllm_says_how_to_install(model_dir, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(_eval_args(model_dir, tmp_path / "v", "--backend", "vllm", "--limit", "1")) == 2
    assert "pip install 'stapo[vllm]'" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_bad_input_is_one_clear_line(model_dir, tmp_path, capsys):
    assert main(_eval_args(model_dir, tmp_path / "x", "--benchmarks", "aime24,gsm8k")) == 2
    assert "--benchmarks: unknown ['gsm8k']" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "nowhere")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path), "--data-dir", str(DATA_DIR), "--limit", "1"]) == 2
    assert "has no checkpoints/ directory" in capsys.readouterr().err
