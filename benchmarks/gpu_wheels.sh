#!/usr/bin/env bash
# Downloads (here, where pip reaches a package index) what the GPU image lacks into .whl/
# (git-ignored locally via .git/info/exclude): the server's packages and llguidance (structured outputs) as
# py3.12 manylinux wheels,
# and the CUTLASS headers' package (Makefile's CUTLASS_PKG) that the sm90 GEMMs build with.
# benchmarks/gpu_run.sh installs them on the GPU machine when .whl is carried.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
# the versions installed in the project's venv (make setup), else in python3's environment
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=()
for p in fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn opentelemetry-api \
         typing_extensions llguidance; do
  pkgs+=("$p==$(ver "$p")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
python3 -m pip download -q --no-deps -d .whl "$(sed -n 's/^CUTLASS_PKG := //p' Makefile)"
ls .whl
