#!/usr/bin/env bash
# Builds gpt_engine.kernels._C for the GPU machine here, where build minutes cost no device time (the
# build there took 4-5 of a session's 30; with the CUTLASS GEMMs it takes ~15 min here). A Python 3.12 venv holds the GPU image's torch
# (2.11.0 with CUDA 13.0) and this machine's nvcc compiles a copy of the working tree; the .so
# and a hash of csrc/ land in kernels/ (git-ignored). Then carry both with the `run` tool:
#   bash benchmarks/gpu_prebuild.sh
#   run carry: [".whl", "kernels/_C.cpython-312-x86_64-linux-gnu.so", "kernels/_C.csrc.sha256"]
# benchmarks/gpu_run.sh uses the carried module when it loads with CUDA and csrc/ is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${GPU_TORCH:-torch==2.11.0}
# the first python3.12 that runs (a pyenv shim may exist without a 3.12 selected)
PY312=${PY312:-$(for p in $(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do
  "$p" -c "" 2>/dev/null && { echo "$p"; break; }; done)}
VENV=${VENV:-/tmp/gpu-build-venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH" "setuptools<82" ninja numpy
fi
"$VENV/bin/pip" install -q --no-deps "$(sed -n 's/^CUTLASS_PKG := //p' Makefile)"  # the sm90 GEMMs' headers
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
(cd "$SRC" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=$(nproc) "$VENV/bin/python" setup.py -q build_ext --inplace)
cp "$SRC"/kernels/_C.cpython-312-*.so kernels/
strip --strip-debug kernels/_C.cpython-312-*.so  # a smaller carry; the symbols stay
bash benchmarks/csrc_hash.sh > kernels/_C.csrc.sha256
ls -la kernels/_C.cpython-312-*.so kernels/_C.csrc.sha256
