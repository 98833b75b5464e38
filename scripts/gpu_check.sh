#!/usr/bin/env bash
# The GPU check (issue 28; BENCHMARKS.md, "GPU check"): token statistics at V = 151,936, bf16 training
# steps of stapo and justrl, eval throughput and FSDP2 over NCCL, in one command on the lent machine as it
# is. Writes gpu_check.json, gpu_check.md and gpu_check.log under $OUT (or --out DIR); exits non-zero on
# any error.
#
#   bash scripts/gpu_wheels.sh                 # here, once: the wheels the GPU image lacks, into .whl/
#   bash scripts/gpu_check.sh                  # there (device tool: run, carry [".whl"])
#   bash scripts/gpu_check.sh --cpu-smoke      # here: the same code at tiny sizes on the CPU (make test)
#
# Packages: when the python already imports math_verify (this project's venv) nothing is installed;
# else the wheels in .whl/ are installed with --no-index --target into a temporary folder on PYTHONPATH.
# --cpu-smoke hides `datasets` from stapo, as the GPU image lacks it: the check must run without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=${WHL:-.whl}
SMOKE=0
for a in "$@"; do if [[ "$a" == "--cpu-smoke" ]]; then SMOKE=1; fi; done
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if ! "$PY" -c "import math_verify" 2>/dev/null; then
  ls "$WHL"/*.whl >/dev/null 2>&1 || { echo "gpu_check: math_verify missing and no wheels in $WHL (run scripts/gpu_wheels.sh here, carry $WHL)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" "$WHL"/*.whl
  export PYTHONPATH="$PYTHONPATH:$TMP/site"
fi
if [[ "$SMOKE" == 1 ]]; then
  mkdir -p "$TMP/hide" && echo 'raise ImportError("datasets is hidden by gpu_check --cpu-smoke: the GPU image lacks it")' >"$TMP/hide/datasets.py"
  export PYTHONPATH="$TMP/hide:$PYTHONPATH"
fi
"$PY" benchmarks/gpu_check.py "$@"
