#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks, for scripts/gpu_check.sh (BENCHMARKS.md, "GPU check").
# Run HERE, where pip reaches a registry; the GPU machine reaches none. Writes .whl/ (git-ignored), which
# the device tool carries with `carry: [".whl"]`; gpu_check.sh installs it with --no-index --target.
#
#   bash scripts/gpu_wheels.sh            # PYTHON=... picks the pip; WHL=... the folder (default .whl)
#
# The image (KINDS.md of the device tool) has torch, transformers, tokenizers, accelerate, safetensors,
# pyarrow, rich, matplotlib, pyyaml, numpy and sympy, but no math-verify (the math reward) and no datasets.
# stapo imports datasets only to read dataset folders / hub datasets, which the check does not, so only
# math-verify and the two packages it needs beyond sympy travel. Versions are the ones pyproject allows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=${WHL:-.whl}
WHEELS=(math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)
LIMIT_MIB=8  # the whole tree that travels is at most 64 MiB; these are pure-Python and small

rm -rf "$WHL" && mkdir -p "$WHL"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHL" "${WHEELS[@]}"
count=$(ls "$WHL"/*.whl | wc -l)
[[ "$count" -eq "${#WHEELS[@]}" ]] || { echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $WHL, got $count" >&2; exit 1; }
kib=$(du -sk "$WHL" | cut -f1)
(( kib <= LIMIT_MIB * 1024 )) || { echo "gpu_wheels: $WHL is $kib KiB, over $LIMIT_MIB MiB" >&2; exit 1; }
ls -l "$WHL"
echo "gpu_wheels: $count wheels, $kib KiB in $WHL (carry it: \"carry\": [\"$WHL\"])"
