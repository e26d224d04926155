"""y = activation(x @ weight.T + bias) with the activation fused into the GEMM epilogue.

CUDA bf16/fp16 can run the tensor-core GEMMs in gpt_engine.kernels._C forward and backward: on an H100
CUTLASS's TMA + wgmma kernels (csrc/gemm_sm90_*.cu), elsewhere an mma.sync kernel (csrc/gemm.cu).
CPU fp32 inference with few rows (the engine's decode steps) runs csrc/linear_cpu.cpp, which
streams the weight in place instead of repacking it per call as BLAS does. Everything else uses
torch's BLAS path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks as C
from ._ext import cuda_ext as _cuda_ext
from ._ext import ext as _ext
from .reference import ACTIVATIONS

_ACT_IDS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def _operand(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (cp.async reads 16-byte chunks)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class LinearFn(torch.autograd.Function):
    """x (..., K), weight (N, K), bias (N,) or None -> act(x @ weight.T + bias) (..., N), CUDA bf16/fp16."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, save_z):
        k, n = x.shape[-1], weight.shape[0]
        x2, w = _operand(x.reshape(-1, k)), _operand(weight)
        act = _ACT_IDS[activation]
        # the pre-activation z is written only when a backward will need it
        y, z = _cuda_ext().gemm(x2, w, None if bias is None else _operand(bias), act, save_z and act != 0)
        ctx.save_for_backward(x2, w, z)
        ctx.act, ctx.has_bias = act, bias is not None
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, w, z = ctx.saved_tensors
        dz = _operand(dy.reshape(-1, w.shape[0]))  # (M, N)
        if ctx.act:
            dz = _cuda_ext().act_bwd(dz, z, ctx.act)  # dy * act'(pre-activation)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _cuda_ext().gemm_dgrad(dz, w).view(*dy.shape[:-1], w.shape[1])  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            dw = _cuda_ext().gemm_wgrad(dz, x2)  # (M, N)^T @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dz.sum(0, dtype=torch.float32).to(dz.dtype)
        return dx, dw, db, None, None


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_gemm(x, weight, backend="auto") -> bool:
    # "auto" keeps cuBLAS: the mma.sync kernel measured 0.36-0.64x of it on an H100
    # (benchmarks/results/nvidia-h100-80gb-hbm3/gemm.csv), and the CUTLASS sm90 kernels that
    # replaced it there have no GPU numbers yet; ours runs when asked for by name.
    return (backend == "custom" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.shape[-1] % 8 == 0
            and x.numel() > 0 and weight.shape[0] > 0 and _cuda_ext() is not None)


# Up to this many rows the CPU kernel beat MKL's sgemm on 2 Zen 3 cores (1.3-3x on a decode
# step, benchmarks/test_bench_linear.py); past ~200 MKL is ~10% faster, so prefill-sized GEMMs
# stay with BLAS unless they carry an activation, which the kernel applies while the rows are
# still in cache (torch's separate GELU pass over a prefill's (2000, 1024) cost as much as the GEMM).
CPU_GEMM_MAX_ROWS = 128


def _use_cpu_gemm(x, weight, bias, activation, backend) -> bool:
    k = x.shape[-1]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and k > 0 and weight.is_contiguous()
            and (backend == "custom" or activation is not None or x.numel() // k <= CPU_GEMM_MAX_ROWS)
            and not _wants_grad(x, weight, bias)
            and not torch.compiler.is_compiling()  # opaque to dynamo: compiled graphs keep torch's op
            and _ext() is not None)


def linear(x, weight, bias=None, activation=None, *, backend="auto"):
    """x (..., K), weight (N, K) as in F.linear, bias (N,) or None; activation None, "gelu",
    "gelu_tanh" or "relu". Differentiable in x, weight and bias.

    backend "auto" takes the fastest measured path: cuBLAS + activation on CUDA, on CPU the
    gpt_engine.kernels._C fp32 GEMM for inference with up to CPU_GEMM_MAX_ROWS rows, else BLAS. "custom"
    runs the gpt_engine.kernels._C GEMMs wherever they apply: CUDA bf16/fp16, and CPU fp32 without grad."""
    C.tensor("x", x), C.tensor("weight", weight, 2)
    if bias is not None:
        C.tensor("bias", bias, 1)
    C.same("x", x, weight=weight, bias=bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features {weight.shape[1]} but x's last dim is {x.shape[-1]}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} elements but weight has {weight.shape[0]} rows")
    if backend not in ("auto", "custom"):
        raise ValueError(f"backend must be 'auto' or 'custom', got {backend!r}")
    if _use_gemm(x, weight, backend):
        return LinearFn.apply(x, weight, bias, activation, _wants_grad(x, weight, bias))
    if _use_cpu_gemm(x, weight, bias, activation, backend):
        # the engine's decode steps come here ~20 times per step with 2-D rows: no reshapes then
        x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
        y = _ext().gemm(x2, weight, None if bias is None else bias.contiguous(), _ACT_IDS[activation], False)[0]
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
    return ACTIVATIONS[activation](F.linear(x, weight, bias))
