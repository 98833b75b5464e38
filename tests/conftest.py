import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/helpers is importable by spawned reward workers too

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# trackio reads its store's folder once, at import: tests write to a temporary one, never to ~/.cache
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="stapo-test-trackio-")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the models are tiny, and two threads contend on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real benchmark/training data beside the project (../shared/data)."""
    path = Path(os.environ.get("STAPO_DATA_DIR", ROOT.parent / "shared" / "data"))
    if not (path / "benchmarks").is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 + a tokenizer trained on the demo task, saved like a user checkpoint."""
    from stapo.demo.task import make_problems
    from stapo.models.tiny import tiny_model_and_tokenizer

    problems = make_problems(200, seed=0)
    texts = [p.prompt for p in problems] + [p.meta["solution"] for p in problems]
    model, tokenizer = tiny_model_and_tokenizer(texts, seed=0)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
