#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_90a with torch's headers and default half/bf16 defines, so
# CUDA code that does not compile cannot land even on machines without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as e; print(e.include_paths()[0])") || exit 1
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])") || exit 1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  if nvcc -std=c++17 -c "$f" -o "$OUT/$(basename "$f").o" -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" \
      -I"$PY_INC" -Icsrc -gencode arch=compute_90a,code=sm_90a \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__; then
    echo "nvcc ok: $f"
  else
    echo "nvcc FAILED: $f" >&2
    status=1
  fi
done
exit $status
