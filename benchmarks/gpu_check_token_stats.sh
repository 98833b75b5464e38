#!/usr/bin/env bash
# GPU check for issue 11 (prepared on a CPU-only machine, not yet run). Needs one CUDA GPU with
# ≥ 80 GB (the naive path at N = 16k, V = 151,936 holds several 9.3 GiB fp32 [N, V] tensors).
#
#   bash benchmarks/gpu_check_token_stats.sh            # benchmarks 1 and 2
#   COMPILE=1 bash benchmarks/gpu_check_token_stats.sh  # also stapo with torch.compile'd chunk kernels
#
# Memory is torch.cuda.max_memory_allocated above the pre-run allocation; time is the median of 5.
# Append the printed tables to benchmarks/RESULTS_token_stats.md with the GPU name they print.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SIZES=(--device cuda --dtype bfloat16 --vocab 151936 --hidden 2048 --n 8192 16384 --repeats 5)

# 1. token statistics, forward + backward: naive, TRL (logits path and 1.16 fused head), stapo
"$PY" benchmarks/bench_token_stats.py "${SIZES[@]}"
# bf16 inputs are exact in TF32, so TF32 GEMMs give the same logits as fp32 ones, much faster
"$PY" benchmarks/bench_token_stats.py "${SIZES[@]}" --tf32 --variants naive stapo
# the LoRA / frozen-head case (backward without logit recomputation)
"$PY" benchmarks/bench_token_stats.py "${SIZES[@]}" --frozen-head --variants naive trl-chunked stapo
if [[ "${COMPILE:-0}" == "1" ]]; then
  "$PY" benchmarks/bench_token_stats.py "${SIZES[@]}" --variants naive stapo --compile
fi

# 2. the S2T mask's cost over justrl at 64k tokens
"$PY" benchmarks/bench_loss_overhead.py --device cuda --b 64 --t 1024
