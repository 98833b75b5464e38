#!/usr/bin/env bash
# Build the separate verl test environment (default .venv-verl): verl, CPU torch and stapo, so
# `stapo.integrations.verl` is tested against verl's real loss code on a machine with no GPU.
#
# Kept apart from the main .venv: verl 0.9.1 pins transformers>=5.5.3,<5.11 and the main stack
# wants newer. Fixes applied (found when verl 0.9.1 was first installed here):
#   - torch is installed first and pinned to the CPU build, so no range pulls a CUDA torch
#     (verl's base requirements name no torch; only its fsdp/megatron/vllm/cpu extras pin torch 2.11,
#     and none of them is installed);
#   - stapo is installed editable, constrained to the versions verl chose, so its own dependency
#     ranges cannot move transformers or torch.
# Usage: scripts/setup_verl_venv.sh [VENV_DIR]    (PYTHON, TORCH, VERL override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-verl}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
VERL=${VERL:-verl==0.9.1}
PY="$VENV/bin/python"

test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH"
"$PY" -m pip install -q "$TORCH" "$VERL"
# Pin everything verl installed, then add stapo and its test tools on top.
pins="$VENV/verl-pins.txt"
"$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$pins"
"$PY" -m pip install -q -c "$pins" -e . 'pytest>=8' 'pytest-timeout>=2.3'
"$PY" -c "import verl, stapo, transformers, torch; print('verl', verl.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
