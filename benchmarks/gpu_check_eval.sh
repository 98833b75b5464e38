#!/usr/bin/env bash
# GPU check of the eval harness (issue 5): HF-backend generation throughput and peak GPU memory
# of `stapo.eval.evaluate` on a randomly initialised Qwen3-0.6B-sized model (no weights, no hub),
# on the first 8 MATH500 problems x 4 samples (the paper's N for MATH500), bf16.
#
#   STAPO_DATA_DIR=/path/to/data bash benchmarks/gpu_check_eval.sh [MAX_NEW_TOKENS]   # default 1024
#
# Needs a CUDA torch plus transformers, math-verify, rich and matplotlib in the active python;
# STAPO_DATA_DIR is the directory holding benchmarks/math500.jsonl (default ../shared/data).
# A random model almost never samples EOS, so nearly every response runs to MAX_NEW_TOKENS:
# tokens/s is the decode rate at batch 32 (8 problems x 4 samples) up to that length.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export STAPO_DATA_DIR="${STAPO_DATA_DIR:-$PWD/../shared/data}"
MAX_NEW_TOKENS="${1:-1024}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

python - "$WORK" "$MAX_NEW_TOKENS" <<'PY'
import json, sys, time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from stapo.data import load_benchmark
from stapo.eval import EvalSettings, evaluate
from stapo.models.tiny import train_tokenizer

work, max_new = Path(sys.argv[1]), int(sys.argv[2])
assert torch.cuda.is_available(), "this check needs a CUDA device"
problems = load_benchmark("math500")[:8]
tok = train_tokenizer([p.prompt for p in load_benchmark("math500")], vocab_size=2000)
# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B): 28 layers, hidden 1024, 16 q / 8 kv heads
# of 128, MLP 3072, vocab 151936, tied embeddings. Random weights; only the shapes matter here.
cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1e6, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
model = Qwen3ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, bf16, {torch.cuda.get_device_name()}")
settings = EvalSettings(benchmarks=("math500",), max_new_tokens=max_new, batch_size=64)
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
results = evaluate(model, tok, {"math500": problems}, settings, work / "eval", model_name="random-qwen3-0.6b")
wall = time.perf_counter() - t0
timing = json.loads((work / "eval" / "timing.json").read_text())
print(f"samples {timing['samples']}  tokens {timing['tokens']}  generate+verify {timing['seconds']:.1f} s  "
      f"-> {timing['tokens_per_s']:.0f} tokens/s  (evaluate() wall {wall:.1f} s)")
print(f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
print(f"avg@4 {results['benchmarks']['math500']['avg']:.3f} (random model: expect 0)")
PY
