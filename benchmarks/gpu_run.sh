#!/usr/bin/env bash
# One lease on the GPU machine: build, GPU tests, then the GPU suites. Logs and results go to $OUT.
#   bash benchmarks/gpu_run.sh [suite names, comma-separated; default all] [pytest -k expr]
#   SKIP_BUILD=1 / SKIP_TESTS=1 for a follow-up call on the same (still warm) machine
#   BUDGET_S=540 (default): the whole call's seconds. A session has 15 minutes of device time and
#   one command at most 10, so every step runs under `timeout` with what is left of the budget
#   (the tests under TEST_S, default 150): suites run in the order given, most wanted first, and a
#   suite cut off still leaves the ones before it packed in results.tgz and its rows in suite.log.
# The image lacks the server's packages and CUTLASS's headers: carry their wheels in .whl/ (the
# `run` tool's carry) and they are installed to /tmp/site first (benchmarks/gpu_wheels.sh
# downloads them).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the repository root never on sys.path (its kernels/ folder would shadow the `kernels` package
# transformers imports): tests import the installed package, the suites run through a folder that
# holds only a link to benchmarks/
export PYTHONSAFEPATH=1
mkdir -p build/bench-path && ln -sfn "$PWD/benchmarks" build/bench-path/benchmarks
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
# a gpt_engine.kernels._C prebuilt here by benchmarks/gpu_prebuild.sh, from the same csrc/, saves the build
if [ "${SKIP_BUILD:-0}" != 1 ] && [ -f kernels/_C.csrc.sha256 ] \
    && [ "$(cat kernels/_C.csrc.sha256)" = "$(bash benchmarks/csrc_hash.sh)" ] \
    && python3 -c "import sys, torch, gpt_engine.kernels._C as C; sys.exit(0 if C.has_cuda() else 1)"; then
  echo "using the carried prebuilt gpt_engine.kernels._C"; SKIP_BUILD=1
fi
if [ "${SKIP_BUILD:-0}" = 1 ]; then echo "skipping build"; else
MAX_JOBS=16 python3 -m pip install -q -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; echo "CUDA BUILD FAILED: retrying CPU-only"; \
       GPT_ENGINE_CPU_ONLY=1 python3 -m pip install -q -e . --no-build-isolation --no-deps >> "$OUT/build.log" 2>&1; }
echo "build took $(( $(date +%s) - t0 ))s"; fi
test_s=$(( $(left) < ${TEST_S:-150} ? $(left) : ${TEST_S:-150} ))
[ "${SKIP_TESTS:-0}" = 1 ] || [ "$test_s" -le 20 ] || timeout "$test_s" \
  python3 -m pytest -q -m gpu tests -p no:cacheprovider --ignore=tests/test_server.py -k "${2:-}" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -40
# one suite at a time, results packed after each: a call cut off at its time limit still brings
# back every suite that finished
suites=${1:-$(ls benchmarks/gpu_*.py | sed -n 's|benchmarks/gpu_\(.*\)\.py|\1|p' | grep -vx suite | paste -sd,)}
for s in ${suites//,/ }; do
  [ "$(left)" -gt 20 ] || { echo "budget spent: $s not run"; continue; }
  PYTHONPATH="$PWD/build/bench-path${PYTHONPATH:+:$PYTHONPATH}" timeout "$(left)" python3 -m benchmarks.gpu_suite --only "$s" 2>&1 | tee -a "$OUT/suite.log" \
    | grep -E "^(==|   )|Error|error" | sed -n 1,30p  # sed reads to the end: no SIGPIPE back into the suite
  [ "${PIPESTATUS[0]}" = 124 ] && echo "$s cut off at the budget"
  tar czf "$OUT/results.tgz" benchmarks/results
done
echo "total $(( $(date +%s) - t0 ))s"
