"""y = activation(x @ weight.T + bias) with the activation fused into the GEMM epilogue.

kernel -> launchers -> autograd (torch.library ops) -> public function. CUDA bf16/fp16 can run
the tensor-core GEMMs of gpt_engine.kernels._C forward and backward (CUTLASS's TMA + wgmma kernels,
csrc/gemm_sm90_*.cu, on Hopper; an mma.sync kernel, csrc/gemm.cu, elsewhere). CPU fp32 inference
with few rows (the engine's decode steps) runs csrc/linear_cpu.cpp, which streams the weight in
place instead of repacking it per call as BLAS does. Everything else uses torch's BLAS path.
The argument rules are csrc/checks.cpp's: the extension's entry points run them, and
kernels/_checks.check before the other paths.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _dispatch as dispatch
from ._ext import ext as _ext
from .reference import ACTIVATIONS

_ACT_IDS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# ---- launchers: x2, dz (M, K) / (M, N) rows; weight (N, K); bias (N,) or None


def _operand(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (cp.async reads 16-byte chunks)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _launch_cuda_fwd(x2, weight, bias, act, save_z):
    """-> y, the pre-activation z (None unless save_z and act)."""
    return _ext().gemm(_operand(x2), _operand(weight), None if bias is None else _operand(bias), act,
                       save_z and act != 0)


def _launch_cuda_bwd(dy, x2, weight, z, act, need_dx, need_dw, has_bias):
    """-> dx (M, K), dweight (N, K), dbias (N,), each None where not needed."""
    dz = _operand(dy)
    if act:
        dz = _ext().act_bwd(dz, z.contiguous(), act)  # dy * act'(pre-activation)
    dx = _ext().gemm_dgrad(dz, _operand(weight)) if need_dx else None  # (M, N) @ (N, K)
    dw = _ext().gemm_wgrad(dz, _operand(x2)) if need_dw else None  # (M, N)^T @ (M, K)
    db = dz.sum(0, dtype=torch.float32).to(dz.dtype) if has_bias else None
    return dx, dw, db


def _launch_cpu(x, weight, bias, act):
    """x (..., K) in any layout; the extension checks the arguments and shapes them."""
    return _ext().gemm(x, weight, bias, act, False)[0]


def _launch_torch(x, weight, bias, activation):
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


# ---- autograd: torch.library ops, opaque to torch.compile (no graph break), differentiable through
# register_autograd

def _no_tensor(like: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an absent output is an empty tensor
    return like.new_empty((0,))


@torch.library.custom_op("gpt_engine::linear_fwd", mutates_args=())
def _linear_fwd(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: int,
                save_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) -> y (M, N), z the pre-activation (empty (0,) unless save_z and act)."""
    y, z = _launch_cuda_fwd(x2, weight, bias, act, save_z)
    return y, _no_tensor(y) if z is None else z


@_linear_fwd.register_fake
def _(x2, weight, bias, act, save_z):
    y = x2.new_empty((x2.shape[0], weight.shape[0]))
    return y, y.new_empty(y.shape) if save_z and act != 0 else _no_tensor(y)


@torch.library.custom_op("gpt_engine::linear_bwd", mutates_args=())
def _linear_bwd(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, act: int, need_dx: bool,
                need_dw: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (M, N) -> dx (M, K), dweight (N, K), dbias (N,); each empty (0,) where not asked for."""
    dx, dw, db = _launch_cuda_bwd(dy, x2, weight, z, act, need_dx, need_dw, has_bias)
    return tuple(_no_tensor(dy) if t is None else t for t in (dx, dw, db))


@_linear_bwd.register_fake
def _(dy, x2, weight, z, act, need_dx, need_dw, has_bias):
    return (x2.new_empty(x2.shape) if need_dx else _no_tensor(dy),
            weight.new_empty(weight.shape) if need_dw else _no_tensor(dy),
            dy.new_empty((weight.shape[0],)) if has_bias else _no_tensor(dy))


def _fwd_setup(ctx, inputs, output):
    x2, weight, bias, ctx.act, _save_z = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x2, weight, output[1])


def _fwd_grad(ctx, dy, _dz):
    x2, weight, z = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = _linear_bwd(dy, x2, weight, z, ctx.act, need_dx, need_dw, need_db)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None


_linear_fwd.register_autograd(_fwd_grad, setup_context=_fwd_setup)


# ---- public function

def linear(x, weight, bias=None, activation=None, *, backend="auto"):
    """x (..., K), weight (N, K) as in F.linear, bias (N,) or None; activation None, "gelu",
    "gelu_tanh" or "relu". Differentiable in x, weight and bias.

    backend "auto" takes the fastest path: cuBLAS + activation on CUDA, on CPU the
    gpt_engine.kernels._C fp32 GEMM for inference with few rows (kernels._dispatch.cpu_gemm), else
    BLAS. "custom" runs the gpt_engine.kernels._C GEMMs wherever they apply: CUDA bf16/fp16, and CPU
    fp32 without grad."""
    C.tensors(x=x, weight=weight)
    if bias is not None:
        C.tensors(bias=bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if backend not in ("auto", "custom"):
        raise ValueError(f"backend must be 'auto' or 'custom', got {backend!r}")
    if dispatch.cpu_gemm(x, weight, bias, activation, backend):
        return _launch_cpu(x, weight, bias, _ACT_IDS[activation])
    C.check("linear", x, weight, bias)
    if dispatch.cuda_gemm(x, weight, backend):
        # the pre-activation z is written only when a backward will need it
        y = _linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, _ACT_IDS[activation],
                        dispatch.wants_grad(x, weight, bias))[0]
        return y.view(*x.shape[:-1], weight.shape[0])
    return _launch_torch(x, weight, bias, activation)
