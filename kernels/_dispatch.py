"""Which implementation serves each op: Triton, gpt_engine.kernels._C (C++ or CUDA), or torch.

One function per decision, each asked by exactly one op file, so the whole routing table reads
here. The ops ask before checking their arguments (a C++ entry point checks its own), so these
look at shapes and layouts without trusting them.

Triton runs on CUDA, and on CPU only under TRITON_INTERPRET=1 (how tests check the Triton
kernels without a GPU). The C++ CPU kernels are opaque to dynamo and have no backward, so the
inference-only ones step aside under autograd and under torch.compile.
"""
from __future__ import annotations

import os

import torch

from ._ext import KERNEL_DTYPES, KV_FP8, cuda_ext, ext

# Up to this many rows the CPU GEMM kernel (csrc/linear_cpu.cpp) streams the weight faster than
# BLAS, which repacks it per call; larger (prefill-sized) GEMMs stay with BLAS unless they carry
# an activation, which the kernel applies while the rows are still in cache.
CPU_GEMM_MAX_ROWS = 128


def wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager_cpu_fp32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


def rows_dense(x: torch.Tensor) -> bool:
    """(N, heads, D) whose rows may be strided but each row is dense, as split from a fused projection
    (csrc/kernel_checks.cpp's rule: sizes 0 and 1 have no stride to keep)."""
    return (x.dim() == 3 and (x.shape[2] <= 1 or x.stride(2) == 1)
            and (x.shape[1] <= 1 or x.stride(1) == x.shape[2]))


def use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels (attention, paged decode, cache write); they take no float64."""
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and x.dtype != torch.float64


# ---- attention.py

def cpu_varlen_attention(q, k, v, paged=False) -> bool:
    """csrc/varlen_cpu.cpp: CPU float32 inference (it has no backward), q's rows dense as split from
    a fused projection, K/V likewise or contiguous paged caches (not fp8)."""
    return (_eager_cpu_fp32(q) and rows_dense(q) and not wants_grad(q, k, v)
            and (k.is_contiguous() and v.is_contiguous() and _cpu_cache(k) if paged
                 else rows_dense(k) and rows_dense(v))
            and ext() is not None)


# ---- paged.py

def _cpu_cache_kernel(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and ext() is not None


def _cpu_cache(cache: torch.Tensor) -> bool:
    """A KV cache format the C++ kernels read: any but fp8 (torch reads that one on CPU)."""
    return cache.dtype != KV_FP8


def cpu_paged_attention(q, k_cache, v_cache) -> bool:
    """csrc/paged_cpu.cpp: CPU fp32/fp16/bf16 over contiguous caches (not fp8)."""
    return (_cpu_cache_kernel(q) and q.dim() == 3 and q.shape[0] > 0 and k_cache.is_contiguous()
            and v_cache.is_contiguous() and _cpu_cache(k_cache))


def cpu_store_kvcache(k, v, k_cache, v_cache) -> bool:
    """csrc/paged_cpu.cpp's cache write: dense rows into contiguous caches (not fp8)."""
    return (_cpu_cache_kernel(k) and rows_dense(k) and rows_dense(v) and k_cache.is_contiguous()
            and v_cache.is_contiguous() and _cpu_cache(k_cache))


# ---- norm.py

@torch.compiler.assume_constant_result
def _ext_serves(device_type: str) -> bool:
    # a constant to torch.compile: dynamo neither traces the lru_cache'd import nor guards on it
    m = ext()
    return m is not None and (device_type == "cpu" or m.has_cuda())


def norm_kernel(x: torch.Tensor) -> bool:
    """csrc/norm_cpu.cpp / csrc/norm.cu (forward and backward) for fp32/fp16/bf16 on CPU and CUDA."""
    if x.dtype not in KERNEL_DTYPES or x.numel() == 0 or x.device.type not in ("cpu", "cuda"):
        return False
    return _ext_serves(x.device.type)


def norm_custom_op() -> bool:
    """The norm kernels through their torch.library ops (autograd, torch.compile); eager inference
    calls the extension directly, without the op's dispatch cost."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling()


# ---- gemm.py

def cuda_gemm(x, weight, backend="auto") -> bool:
    """The tensor-core GEMMs (csrc/gemm.cu, csrc/gemm_sm90_*.cu) forward and backward, only when asked
    for by name: "auto" keeps cuBLAS until ours is measured ahead of it (benchmarks/results)."""
    return (backend == "custom" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dim() > 0
            and x.numel() > 0 and x.shape[-1] % 8 == 0 and weight.dim() == 2 and weight.shape[0] > 0
            and cuda_ext() is not None)


def cpu_gemm(x, weight, bias, activation, backend="auto") -> bool:
    """csrc/linear_cpu.cpp: CPU float32 inference with a contiguous weight, for up to
    CPU_GEMM_MAX_ROWS rows or with a fused activation ("custom": whenever it applies)."""
    k = x.shape[-1] if x.dim() else 0
    return (_eager_cpu_fp32(x) and k > 0 and weight.is_contiguous()
            and (backend == "custom" or activation is not None or x.numel() // k <= CPU_GEMM_MAX_ROWS)
            and not wants_grad(x, weight, bias)
            and ext() is not None)


# ---- packed.py, decode.py, rotary.py, glu.py

# The weight formats the packed CPU GEMM reads (csrc/linear_cpu.cpp fp32, csrc/quant_cpu.cpp bf16, int8 and
# w8a8 as uint8)
PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)


def cpu_packed_weight(weight: torch.Tensor) -> bool:
    """Whether the packed CPU GEMM can take weight: on CPU in one of PACKED_DTYPES, extension built."""
    return weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and ext() is not None


def cpu_decode_layer(x: torch.Tensor, weights) -> bool:
    """The CPU decode kernels (decode_layer, packed_linear, glu) for CPU float32 inference with
    contiguous weights (packed GEMM weights in any of PACKED_DTYPES); not under TRITON_INTERPRET=1,
    where tests want the per-op path."""
    return cpu_inference(x) and all(w is None or (w.dtype in PACKED_DTYPES and w.is_contiguous()) for w in weights)


def cpu_inference(x: torch.Tensor) -> bool:
    """cpu_decode_layer's test of x alone: for weights a pack_layer already holds."""
    return _eager_cpu_fp32(x) and not torch.is_grad_enabled() and not use_triton(x) and ext() is not None


# ---- quant.py

# Up to this many rows (decode-sized batches) the w8a16 kernel streams the int8 weight once; larger
# GEMMs are compute bound and go to the dequantised weight's tensor-core GEMM.
W8A16_MAX_ROWS = 64


def triton_w8a16(x: torch.Tensor) -> bool:
    """kernels/triton_w8a16.py: inference on CUDA (or CPU under TRITON_INTERPRET=1, fp32/fp16 there)
    for at most W8A16_MAX_ROWS rows."""
    k = x.shape[-1] if x.dim() else 0
    return (use_triton(x) and x.device.type in ("cuda", "cpu") and k > 0 and x.numel() // k <= W8A16_MAX_ROWS
            and (x.is_cuda or x.dtype in (torch.float32, torch.float16)) and not wants_grad(x))
