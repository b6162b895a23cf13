#!/usr/bin/env bash
# Fetch, here, the wheels a bare GPU machine lacks to run tools/gpu/rehearse.sh: the versions pinned in
# docker/constraints.txt, built for its Python (3.12, x86-64). The machine has PyTorch, numpy, pyarrow and pandas
# but no network; it gets these wheels as a carried folder (default .whl, which git must ignore).
#
#   tools/gpu/wheels.sh [DEST]     download into DEST (default .whl)
#   tools/gpu/wheels.sh --pins     print the pinned requirements only (no network)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEST="${1:-.whl}"
PYTHON="${PYTHON:-.venv/bin/python}"
PY_VERSION="${PY_VERSION:-3.12}"
# What the trainer and the benchmark need beyond what such a machine has (tests/test_gpu_tools.py keeps this list
# complete): our pins win over its versions where both exist.
PACKAGES=(
  transformers huggingface-hub httpx2 httpcore2 truststore tokenizers hf-xet safetensors accelerate peft datasets dill multiprocess fsspec
  filelock pydantic pydantic-core annotated-types typing-inspection typing-extensions soundfile cffi pycparser soxr
  tenacity python-dotenv jiwer rapidfuzz click pyyaml regex
)
pins=()
for name in "${PACKAGES[@]}"; do
  pin="$(grep -iE "^${name//-/[-_.]}==" docker/constraints.txt || true)"
  [[ -n "$pin" ]] || { echo "wheels: $name is not pinned in docker/constraints.txt" >&2; exit 2; }
  pins+=("$pin")
done
if [[ "$DEST" == --pins ]]; then
  printf '%s\n' "${pins[@]}"
  exit 0
fi
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pins[@]}"
echo "wheels: $(ls "$DEST"/*.whl | wc -l) in $DEST ($(du -sh "$DEST" | cut -f1))"
