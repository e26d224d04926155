#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_90a with torch's headers and default half/bf16 defines (and
# CUTLASS's headers, from `make cutlass`), so CUDA code that does not compile cannot land even
# on machines without a GPU. Files compile in parallel: the CUTLASS ones take minutes each.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as e; print(e.include_paths()[0])") || exit 1
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])") || exit 1
CUTLASS=$("$PY" -c "import importlib.util as u; print(list(u.find_spec('cutlass_library').submodule_search_locations)[0] + '/source')") || {
  echo "nvcc check: CUTLASS headers not found (make cutlass)" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export TORCH_INC PY_INC CUTLASS OUT
compile() {
  if nvcc -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -c "$1" -o "$OUT/$(basename "$1").o" \
      -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$PY_INC" -Icsrc \
      -I"$CUTLASS/include" -I"$CUTLASS/tools/util/include" -DWITH_CUDA -DGPT_ENGINE_CUTLASS \
      -gencode arch=compute_90a,code=sm_90a \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ >"$OUT/$(basename "$1").log" 2>&1; then
    echo "nvcc ok: $1"
  else
    cat "$OUT/$(basename "$1").log" >&2
    echo "nvcc FAILED: $1" >&2
    return 1
  fi
}
export -f compile
# the slowest (CUTLASS) files first so the pool ends together
ls csrc/*.cu | sort -r | xargs -P "$(nproc)" -I{} bash -c 'compile {}'
