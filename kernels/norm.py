"""LayerNorm and RMSNorm over the last dim, with an optional fused residual add.

kernel (csrc/norm_cpu.cpp, csrc/norm.cu) -> launchers -> autograd (torch.library ops) -> public
functions. Where the kernels do not serve (float64, no extension) kernels.reference runs.
The argument rules are csrc/checks.cpp's: the extension's entry points run them, and
kernels/_checks.check before the other paths.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from . import _dispatch as dispatch
from . import reference
from ._ext import ext as _ext

# ---- launchers: x, residual, dy, h, dh (rows, N); weight, bias (N,) in x's dtype; mean, rstd (rows,) fp32


def _no_tensor(like: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an absent output (h without residual, dbias without bias) is an empty tensor
    return like.new_empty((0,))


def _contig(t):
    return None if t is None else t.contiguous()


def _launch_fwd(x, residual, weight, bias, eps, rms):
    """-> y, h = x + residual (None without residual), mean, rstd. The extension takes x (..., N)
    in any layout and weight, bias in any float dtype (cast to x's)."""
    return _ext().norm_fwd(x, residual, weight, bias, eps, rms)


def _launch_bwd(dy, h, dh, weight, mean, rstd, has_bias, rms):
    """-> dx (also residual's grad), dweight, dbias (None unless has_bias)."""
    return _ext().norm_bwd(dy.contiguous(), h.contiguous(), _contig(dh), weight.contiguous(), mean.contiguous(),
                           rstd.contiguous(), has_bias, rms)


# ---- autograd: torch.library ops, opaque to torch.compile (no graph break), differentiable through
# register_autograd

@torch.library.custom_op("gpt_engine::norm_fwd", mutates_args=())
def _norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
              eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y, h = x + residual (empty (0,) without residual), mean, rstd."""
    y, h, mean, rstd = _launch_fwd(x, residual, weight, bias, eps, rms)
    return y, _no_tensor(x) if h is None else h, mean, rstd


@_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, rms):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    h = _no_tensor(x) if residual is None else x.new_empty(x.shape)
    return x.new_empty(x.shape), h, stats, torch.empty_like(stats)


@torch.library.custom_op("gpt_engine::norm_bwd", mutates_args=())
def _norm_bwd(dy: torch.Tensor, h: torch.Tensor, dh: Optional[torch.Tensor], weight: torch.Tensor,
              mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
              rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: the normalized input (x + residual, or x); dh: the incoming grad of the h output or None
    -> dx (also residual's grad), dweight, dbias (empty (0,) unless has_bias)."""
    dx, dw, db = _launch_bwd(dy, h, dh, weight, mean, rstd, has_bias, rms)
    return dx, dw, _no_tensor(weight) if db is None else db


@_norm_bwd.register_fake
def _(dy, h, dh, weight, mean, rstd, has_bias, rms):
    return h.new_empty(h.shape), weight.new_empty(weight.shape), \
        weight.new_empty(weight.shape) if has_bias else _no_tensor(weight)


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, residual, _eps, ctx.rms = inputs
    _y, h, mean, rstd = output
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)


def _fwd_grad(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_bwd(dy, h, dh if ctx.has_residual else None, weight, mean, rstd, ctx.has_bias, ctx.rms)
    # h = x + residual, so both receive the same gradient
    return dx, dw, db if ctx.has_bias else None, dx if ctx.has_residual else None, None, None


_norm_fwd.register_autograd(_fwd_grad, setup_context=_fwd_setup)


# ---- public functions

def _norm(x, weight, bias, eps, residual, rms):
    C.tensors(x=x, weight=weight)
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None:
            C.tensors(**{name: t})
    eps = float(eps)
    if not dispatch.norm_kernel(x):
        C.check("norm", x, weight, bias, residual, eps)
        if rms:
            return reference.rms_norm(x, weight, eps, residual)
        return reference.layer_norm(x, weight, bias, eps, residual)
    if not dispatch.norm_custom_op():  # the extension checks and shapes the arguments itself
        y, h = _launch_fwd(x, residual, weight, bias, eps, rms)[:2]
        return y if residual is None else (y, h)
    C.check("norm", x, weight, bias, residual, eps)
    # parameters kept in another float dtype (e.g. fp32 masters) are cast; autograd carries the grad back
    weight = weight.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    r2 = None if residual is None else residual.reshape(-1, n).contiguous()
    y, h = _norm_fwd(x2, weight, bias, r2, eps, rms)[:2]
    return y.view(x.shape) if residual is None else (y.view(x.shape), h.view(x.shape))


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over x's last dim (fp32 statistics). With residual, returns
    (layer_norm(x + residual), x + residual) from one fused pass."""
    return _norm(x, weight, bias, eps, residual, rms=False)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over x's last dim (fp32 statistics). With residual, returns
    (rms_norm(x + residual), x + residual) from one fused pass."""
    return _norm(x, weight, None, eps, residual, rms=True)
