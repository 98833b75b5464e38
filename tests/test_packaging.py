"""The built wheel carries the six benchmarks: installed alone, away from the source tree and from
../shared, it loads all six with their row counts, and ``stapo eval`` runs end to end on them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_COUNTS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 675}

pytestmark = pytest.mark.slow


def _pip(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip wheel .`` then ``pip install --no-deps --target``: a folder holding only the installed stapo."""
    wheels, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "stapo"
    for part in ("pyproject.toml", "README.md"):  # a copy: the build writes build/ and egg-info beside it
        (source / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, source / part)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = ["wheel", str(source), "--no-deps", "-q", "-w", str(wheels)]
    done = _pip(*build, "--no-build-isolation")  # offline, with the venv's setuptools
    if done.returncode != 0:
        done = _pip(*build)  # an isolated build (fetches setuptools from the package index)
    assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("stapo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "stapo/data/benchmarks_data/LICENSE.math-evaluation-harness" in names
    target = tmp_path_factory.mktemp("site")
    done = _pip("install", "--no-deps", "-q", "--target", str(target), str(wheel))
    assert done.returncode == 0, done.stderr
    return target


def _env(site: Path) -> dict:
    """Only the installed copy of stapo is importable (its dependencies come from this venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STAPO_DATA_DIR")}
    return env | {"PYTHONPATH": str(site)}


def test_wheel_ships_the_six_benchmarks(installed, tmp_path):
    code = (
        "import json, stapo; from stapo.data import BENCHMARKS, load_benchmark; "
        "print(json.dumps({'file': stapo.__file__, 'rows': {b: len(load_benchmark(b)) for b in BENCHMARKS}}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed),
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["file"]).is_relative_to(installed)  # not the source tree
    assert out["rows"] == ROW_COUNTS


def test_eval_runs_without_a_data_directory(installed, tmp_path):
    """Done means: ``stapo eval --model CKPT --benchmarks math500 --limit 3`` with no ../shared and no
    STAPO_DATA_DIR, from a folder outside the project."""
    from stapo.data import apply_template, load_benchmark
    from stapo.models.tiny import tiny_model_and_tokenizer

    texts = [apply_template(p.prompt) for p in load_benchmark("math500")[:50]] + ["\\boxed{12}"]
    model, tok = tiny_model_and_tokenizer(texts, vocab_size=400, max_position_embeddings=2048, hidden_size=64,
                                          num_heads=2, intermediate_size=128)  # fmt: skip
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    work = tmp_path / "elsewhere"
    work.mkdir()
    cmd = [sys.executable, "-m", "stapo", "eval", "--model", str(ckpt), "--benchmarks", "math500", "--limit", "3",
           "--max-new-tokens", "8", "--reward-workers", "1", "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, cwd=work, env=_env(installed), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads(next((work / "eval_runs").glob("*/results.json")).read_text())
    assert list(results["benchmarks"]) == ["math500"]
    assert results["benchmarks"]["math500"]["n_problems"] == 3
    assert results["benchmarks"]["math500"]["n_samples"] == 4  # the default N for math500
