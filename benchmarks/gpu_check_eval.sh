#!/usr/bin/env bash
# GPU check of the eval harness (issue 5): HF-backend generation throughput and peak GPU memory
# of `stapo.eval.evaluate` on a randomly initialised Qwen3-0.6B-sized model (no weights, no hub),
# on the first 8 MATH500 problems x 4 samples (the paper's N for MATH500), bf16.
#
#   STAPO_DATA_DIR=/path/to/data bash benchmarks/gpu_check_eval.sh [MAX_NEW_TOKENS] [--cpu-smoke]   # default 1024
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

python benchmarks/gpu_check_eval.py "$WORK" "$MAX_NEW_TOKENS" "${@:2}"
