"""`stapo eval` as a hostile user drives it: two writers, a changed resume, a run folder as --model,
a pipe instead of a terminal. A tiny random Qwen3 on disk, the bundled benchmarks, real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stapo.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("STAPO_DATA_DIR", ROOT.parent / "shared" / "data"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
pytestmark = pytest.mark.skipif(not (DATA_DIR / "benchmarks").is_dir(), reason=f"no benchmark data at {DATA_DIR}")

QUICK = ["--benchmarks", "amc23,math500", "--limit", "1", "--samples", "amc23=2,math500=2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 whose tokenizer was trained on the benchmarks' text (short prompts), saved to disk."""
    from stapo.data import apply_template, load_benchmark
    from stapo.models.tiny import tiny_model_and_tokenizer

    texts = [apply_template(p.prompt) for b in ("amc23", "math500") for p in load_benchmark(b, data_dir=DATA_DIR)]
    model, tok = tiny_model_and_tokenizer(texts, vocab_size=1000, max_position_embeddings=2048, hidden_size=64,
                                          num_heads=2, intermediate_size=128)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(model_dir, out, *extra, quiet=True):
    return ["eval", "--model", str(model_dir), "--data-dir", str(DATA_DIR), "--out", str(out),
            "--max-new-tokens", "4", "--reward-workers", "1", *(["--quiet"] if quiet else []), *extra]


def _stapo(*args):
    return subprocess.Popen([sys.executable, "-m", "stapo", *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_eval_into_one_out_exits_2_naming_the_holder(model_dir, tmp_path):
    out = tmp_path / "out"
    # the first eval has minutes of work; the second starts while it holds the folder
    first = _stapo(*_args(model_dir, out, "--benchmarks", "math500", "--limit", "200", "--samples", "math500=16",
                          "--max-new-tokens", "256"))
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").exists() and (out / ".lock").read_text().strip()):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first eval never took the lock"
            time.sleep(0.1)
        second = _stapo(*_args(model_dir, out, *QUICK))
        _, err = second.communicate(timeout=120)
        assert first.poll() is None, "the first eval ended before the second one checked the lock"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert err.strip().splitlines() == [
        (f"stapo eval: error: --out {out} is in use by another stapo process (PID {first.pid}); "
         "wait for it to finish or stop it, or choose another --out")
    ]


def test_resume_with_another_dtype_is_refused_and_both_spellings_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(model_dir, out, *QUICK, "--dtype", "fp32")) == 0
    samples = (out / "samples.jsonl").read_bytes()
    assert samples.count(b"\n") == 4
    capsys.readouterr()

    assert main(_args(model_dir, out, *QUICK, "--dtype", "bf16")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"stapo eval: error: {out}: holds samples from other settings")
    assert "(dtype: 'float32' -> 'bfloat16')" in err
    assert main(_args(model_dir, out, *QUICK, "--max-new-tokens", "5")) == 2
    assert "(max_new_tokens: 4 -> 5)" in capsys.readouterr().err
    assert (out / "samples.jsonl").read_bytes() == samples  # nothing mixed in

    assert main(_args(model_dir, out, *QUICK, "--dtype", "float32")) == 0  # the long spelling is the same dtype
    assert (out / "samples.jsonl").read_bytes() == samples


def test_a_run_folder_as_model_points_to_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002" / "policy").mkdir(parents=True)
    assert main(["eval", "--model", str(run), "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"stapo eval: error: --model {run}: is a stapo run folder, not a model; "
                                       f"evaluate its checkpoints with `stapo eval --run {run}`\n")
    assert not (tmp_path / "o").exists()


def test_bad_input_uses_the_error_prefix_and_leaves_no_folder(tmp_path, capsys):
    assert main(["eval", "--model", "x", "--data-dir", str(DATA_DIR), "--benchmarks", "gsm8k"]) == 2
    assert capsys.readouterr().err.startswith("stapo eval: error: --benchmarks: unknown ['gsm8k']")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    assert main(["eval", "--model", str(not_a_model), "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "o"),
                 "-q", *QUICK]) == 2
    err = capsys.readouterr().err
    assert err == (f"stapo eval: error: --model: {not_a_model} is a folder but not a model: it has no config.json "
                   "(expected a save_pretrained folder or a hub id)\n")
    assert not (tmp_path / "o").exists()


def test_progress_in_a_pipe_names_each_benchmark(model_dir, tmp_path):
    proc = _stapo(*_args(model_dir, tmp_path / "out", *QUICK, "--limit", "2", quiet=False))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "\r" not in err  # a pipe gets plain lines, not a redrawn bar
    lines = err.splitlines()
    assert lines[0].startswith(f"stapo eval: loading {model_dir} (float32, hf)")
    # batch 2: amc23 is two chunks of 2 samples (first and last line), math500 one
    # batch 2, 2 samples: each benchmark is two chunks of one problem; its first chunk and its end are shown
    for bench in ("amc23", "math500"):
        assert re.search(rf"^stapo eval: {bench}: 2/4 samples \(50%\), \d+:\d\d elapsed, ETA \d+:\d\d$", err, re.MULTILINE)
        assert re.search(rf"^stapo eval: {bench}: 4/4 samples, done in \d+:\d\d$", err, re.MULTILINE)
    assert "Loading weights" not in err


def test_progress_in_a_terminal_is_a_bar_per_benchmark(model_dir, tmp_path):
    import pty

    master, slave = pty.openpty()  # a real terminal on stderr
    proc = subprocess.Popen([sys.executable, "-m", "stapo", *_args(model_dir, tmp_path / "out", *QUICK, "--limit", "2",
                                                                  quiet=False)],
                            cwd=ROOT, env={**ENV, "COLUMNS": "120"}, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    screen = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", b"".join(chunks)).decode(errors="replace")
    for bench in ("amc23", "math500"):  # each bar carries its benchmark's name and its own count
        assert re.search(rf"stapo eval: {bench}\s.*4/4", screen), screen[-2000:]
