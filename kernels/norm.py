"""LayerNorm and RMSNorm over the last dim, with an optional fused residual add.

CPU and CUDA tensors (fp32/fp16/bf16) run kernels._C (csrc/norm_cpu.cpp, csrc/norm.cu);
float64 and builds without the extension use kernels.reference.
"""
from __future__ import annotations


import torch

from . import _checks as C
from . import reference
from ._ext import ext as _ext

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_ext(x: torch.Tensor) -> bool:
    if x.dtype not in _KERNEL_DTYPES or x.numel() == 0 or x.device.type not in ("cpu", "cuda"):
        return False
    ext = _ext()
    return ext is not None and (x.device.type == "cpu" or ext.has_cuda())


def _forward(x, weight, bias, residual, eps, rms):
    """-> y (rows, N), h = x + residual (rows, N) or None, x (rows, N), mean, rstd."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    r2 = None if residual is None else residual.reshape(-1, n).contiguous()
    b = None if bias is None else bias.contiguous()
    y, h, mean, rstd = _ext().norm_fwd(x2, r2, weight.contiguous(), b, eps, rms)
    return y, h, x2, mean, rstd


def _outputs(x, y, h):
    return y.view(x.shape) if h is None else (y.view(x.shape), h.view(x.shape))


class NormFn(torch.autograd.Function):
    """y = norm(x [+ residual]) * weight [+ bias]; with residual also returns h = x + residual.
    x, residual (..., N) flattened to (rows, N); weight, bias (N,) already in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms):
        y, h, x2, mean, rstd = _forward(x, weight, bias, residual, eps, rms)
        ctx.save_for_backward(x2 if h is None else h, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.has_residual = rms, bias is not None, residual is not None
        return _outputs(x, y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, mean, rstd = ctx.saved_tensors
        n = h.shape[-1]
        dh2 = None if dh is None else dh.reshape(-1, n).contiguous()
        dx, dw, db = _ext().norm_bwd(dy.reshape(-1, n).contiguous(), h, dh2, weight.contiguous(), mean, rstd,
                                     ctx.has_bias, ctx.rms)
        dx = dx.view(dy.shape)
        # h = x + residual, so both receive the same gradient
        return dx, dw, db if ctx.has_bias else None, dx if ctx.has_residual else None, None, None


def _check(x, weight, bias, residual):
    C.tensor("x", x), C.tensor("weight", weight, 1)
    if bias is not None:
        C.tensor("bias", bias, 1)
    if residual is not None:
        C.tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    C.same("x", x, residual=residual)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
        if p.shape[0] != x.shape[-1]:
            raise ValueError(f"{name} has {p.shape[0]} elements but x's last dim is {x.shape[-1]}")


def _norm(x, weight, bias, eps, residual, rms):
    # parameters kept in another float dtype (e.g. fp32 masters) are cast; autograd carries the grad back
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if not torch.is_grad_enabled():  # inference: skip the autograd.Function's per-call overhead
        y, h = _forward(x, weight, bias, residual, float(eps), rms)[:2]
        return _outputs(x, y, h)
    return NormFn.apply(x, weight, bias, residual, float(eps), rms)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over x's last dim (fp32 statistics). With residual, returns
    (layer_norm(x + residual), x + residual) from one fused pass."""
    _check(x, weight, bias, residual)
    if not _use_ext(x):
        return reference.layer_norm(x, weight, bias, eps, residual)
    return _norm(x, weight, bias, eps, residual, rms=False)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over x's last dim (fp32 statistics). With residual, returns
    (rms_norm(x + residual), x + residual) from one fused pass."""
    _check(x, weight, None, residual)
    if not _use_ext(x):
        return reference.rms_norm(x, weight, eps, residual)
    return _norm(x, weight, None, eps, residual, rms=True)
