# gpt-engine: `make run` (set-up + train + generate) and `make test` (set-up + CPU tests).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GPT := $(VENV)/bin/gpt-engine
RUN_DIR ?= runs/tiny
# the tested versions (see constraints.txt); `make clean test CONSTRAINTS=` runs on the newest releases
CONSTRAINTS ?= constraints.txt
TRITON_CPU := triton==3.9.0
PIP_C := $(if $(CONSTRAINTS),-c $(VENV)/constraints.txt)
# no script directory or cwd on sys.path: the repository's kernels/ folder must never shadow the
# `kernels` package that transformers imports (Python >= 3.11; tests import the installed package)
export PYTHONSAFEPATH := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# benchmarks run as `python -m benchmarks.X` from a folder that holds only a link to benchmarks/,
# so that the repository root (and its kernels/ folder) never lands on sys.path
BENCH_PATH = mkdir -p build/bench-path && ln -sfn $(CURDIR)/benchmarks build/bench-path/benchmarks \
	&& PYTHONPATH=$(CURDIR)/build/bench-path

.PHONY: setup run chat test fuzz sanitize bench constraints gpu-check cutlass clean mutate

$(VPY):
	$(PY) -m venv $(VENV) --system-site-packages

# torch only when none is importable (a system torch is reused through --system-site-packages)
$(STAMP): $(VPY) pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install torch==2.13.0 || $(VPY) -m pip install torch
	# a CUDA torch pins its own triton; a CPU-only torch gets the tested one
	$(if $(CONSTRAINTS),{ cat $(CONSTRAINTS); $(VPY) -c "import torch; print('' if torch.version.cuda else '$(TRITON_CPU)')"; } > $(VENV)/constraints.txt)
	$(VPY) -m pip install -q $(PIP_C) setuptools wheel ninja pybind11
	MAX_JOBS=$$(nproc) $(VPY) -m pip install -q $(PIP_C) -e '.[test,bench]' --no-build-isolation
	cd $(VENV) && ./bin/python -c "import torch, gpt_engine.kernels._C"
	touch $@

setup: $(STAMP)

run: setup
	$(GPT) train --out $(RUN_DIR)
	$(GPT) generate $(RUN_DIR) --max-tokens 96 --temperature 0.8 --seed 0 \
		--prompt "def " --prompt "import os" --prompt "class Parser:" --prompt "    for i in range(" \
		--prompt "# Copyright" --prompt "if __name__ ==" --prompt "try:" --prompt "def __init__(self"

# fine-tunes make run's model (pretrained first when absent) on questions about the standard library's
# docstrings, prints the held-out answer loss before and after, then opens the terminal chat
chat: setup
	$(VPY) -m gpt_engine.cli.chat_demo --base $(RUN_DIR) --out runs/chat

# pytest exits 5 when it collects nothing: not a failure here
test: setup
	$(VPY) -m pytest -q -m "not gpu" -p no:cacheprovider || [ $$? -eq 5 ]

# property-based fuzzing of every public kernel op (tests/test_fuzz_ops.py) with many examples, from a
# new seed each run (printed first; FUZZ_SEED=N make fuzz replays that run); make test runs its
# bounded, derandomized profile
fuzz: setup
	seed=$${FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; echo "make fuzz: FUZZ_SEED=$$seed"; \
	GPT_ENGINE_FUZZ=fuzz $(VPY) -m pytest -q -p no:cacheprovider tests/test_fuzz_ops.py --hypothesis-seed=$$seed

# gpt_engine.kernels._C built with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only) into
# build/sanitize (the normal build untouched), then the tests that reach every entry point of
# csrc/bindings.cpp run on it: a package layout there (engine/, kernels/ and the sanitized _C) goes
# first on PYTHONPATH, and the sanitizers' runtimes are preloaded (python itself is not
# instrumented). Python's own allocations live until exit: no leak check.
SAN := build/sanitize
SAN_TESTS := tests/test_fuzz_ops.py \
	$(addprefix tests/test_decode_layer.py::test_,matches_reference traits_match_reference halves_make_the_layer window_matches_reference \
		errors packed_gemm packed_gemm_errors glu partial_rope lora_updates_match_the_reference lora_add_matches_reference \
		lora_argument_errors) \
	tests/test_structured.py::test_token_bitmask_kernel_matches_reference \
	tests/test_attention.py::test_varlen_cpu_kernel $(addprefix tests/test_attention.py::test_varlen_cpu_kernel_,paged \
		takes_strided_offsets errors window paged_window) \
	$(addprefix tests/test_paged_attention.py::test_,decode_fp32 decode_cpu_bf16_fp64 decode_cpu_strided_q \
		cpu_kernel_rejects_bad_tables store_kvcache decode_window_fp32 decode_window_reads_only_its_blocks) \
	$(addprefix tests/test_quant.py::test_,packed_int8 packed_w8a8 packed_bf16 packed_low_errors decode_layer_low \
		packed_rows unpack_linear_roundtrip) \
	$(addprefix tests/test_norm.py::test_,backward_fp32_vs_float64_reference low_precision_within_2x_torch \
		bindings_validate_inputs) \
	$(addprefix tests/test_linear.py::test_,cpu_gemm_vs_reference cpu_gemm_errors \
		backward_gemm_bindings_check_their_input) \
	$(addprefix tests/test_kv_dtype.py::test_,store_matches_reference decode_reads_the_stored_format \
		decode_splits_few_sequences_over_threads paged_prefill_reads_the_stored_format decode_layer_matches_reference \
		bad_caches_are_refused) \
	tests/test_debug_checks.py::test_bad_indices_raise
SAN_ENV := PYTHONPATH=$(CURDIR)/$(SAN)/pkg \
	LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
sanitize: setup
	GPT_ENGINE_SANITIZE=1 MAX_JOBS=$$(nproc) $(VPY) setup.py -q build_ext --build-temp $(SAN)/tmp --build-lib $(SAN)/lib
	rm -rf $(SAN)/pkg && mkdir -p $(SAN)/pkg && cp -r engine $(SAN)/pkg/gpt_engine && cp -r kernels $(SAN)/pkg/gpt_engine/
	rm -f $(SAN)/pkg/gpt_engine/kernels/_C*.so && cp $(SAN)/lib/gpt_engine/kernels/_C*.so $(SAN)/pkg/gpt_engine/kernels/
	$(SAN_ENV) $(VPY) -c "import torch, gpt_engine.kernels._C as c; assert '$(SAN)/pkg' in c.__file__ and not c.has_cuda()"
	$(SAN_ENV) $(VPY) -m pytest -q -m "not gpu" -p no:cacheprovider $(SAN_TESTS) -k "not triton"

# mutation run over the core modules (kv_cache, scheduler, sampling, stop check, auth, error
# mapping, attention offsets, norms): each named mutation in .ci/mutate.py is applied to a temporary
# copy of the repository, never to this tree, and must make its targeted tests fail; prints
# killed/total and the survivors, fails if a must-kill one survives (~10-20 min on 2 cores)
mutate: setup
	$(VPY) .ci/mutate.py

# refresh constraints.txt on purpose: the newest releases that resolve for .[test,bench]
constraints: $(VPY)
	$(VPY) .ci/constraints.py > constraints.txt

bench: setup
	$(VPY) -m pytest benchmarks -q --benchmark-only -p no:cacheprovider || [ $$? -eq 5 ]
	$(GPT) bench gpt2-tiny --num-prompts 32

# CUTLASS's headers (for csrc/gemm_sm90_*.cu), from their package without its Python dependencies
CUTLASS_PKG := nvidia-cutlass==4.2.0.0
cutlass: $(VPY)
	$(VPY) -m pip install -q --no-deps $(CUTLASS_PKG)

# On a GPU machine whose python already holds torch+CUDA (no registry access there).
gpu-check:
	MAX_JOBS=16 $(PY) -m pip install -q -e . --no-build-isolation --no-deps
	$(PY) -m pytest -q -m gpu tests -p no:cacheprovider || [ $$? -eq 5 ]
	$(BENCH_PATH) $(PY) -m benchmarks.gpu_suite

clean:
	rm -rf build $(VENV) *.egg-info kernels/_C*.so
