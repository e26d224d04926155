# gpt-engine: `make run` (set-up + train + generate) and `make test` (set-up + CPU tests).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/tiny
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test bench gpu-check cutlass clean

$(VPY):
	$(PY) -m venv $(VENV) --system-site-packages

# torch only when none is importable (a system torch is reused through --system-site-packages)
$(STAMP): $(VPY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install torch==2.13.0 || $(VPY) -m pip install torch
	$(VPY) -m pip install -q setuptools wheel ninja pybind11
	MAX_JOBS=$$(nproc) $(VPY) -m pip install -q -e '.[test]' --no-build-isolation
	$(VPY) -c "import torch, kernels._C"
	touch $@

setup: $(STAMP)

run: setup
	$(VPY) -m engine train --out $(RUN_DIR)
	$(VPY) -m engine generate $(RUN_DIR) --max-tokens 96 --temperature 0.8 --seed 0 \
		--prompt "def " --prompt "import os" --prompt "class Parser:" --prompt "    for i in range(" \
		--prompt "# Copyright" --prompt "if __name__ ==" --prompt "try:" --prompt "def __init__(self"

# pytest exits 5 when it collects nothing: not a failure here
test: setup
	$(VPY) -m pytest -q -m "not gpu" -p no:cacheprovider || [ $$? -eq 5 ]

bench: setup
	$(VPY) -m pytest benchmarks -q --benchmark-only -p no:cacheprovider || [ $$? -eq 5 ]
	$(VPY) -m engine bench gpt2-tiny --num-prompts 32

# CUTLASS's headers (for csrc/gemm_sm90_*.cu), from their package without its Python dependencies
CUTLASS_PKG := nvidia-cutlass==4.2.0.0
cutlass: $(VPY)
	$(VPY) -m pip install -q --no-deps $(CUTLASS_PKG)

# On a GPU machine whose python already holds torch+CUDA (no registry access there).
gpu-check:
	MAX_JOBS=16 $(PY) -m pip install -q -e . --no-build-isolation --no-deps
	$(PY) -m pytest -q -m gpu tests -p no:cacheprovider || [ $$? -eq 5 ]
	$(PY) -m benchmarks.gpu_suite

clean:
	rm -rf build $(VENV) *.egg-info kernels/_C*.so
