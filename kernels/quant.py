"""int8 weight-only quantisation (symmetric, per output channel or per group along K) and its GEMM.

quantize_int8 runs once, at load time; linear_int8 is kernels.linear on the dequantised weight:
the Triton w8a16 kernel (triton_w8a16.py) for decode-sized batches on CUDA (and on CPU tensors
under TRITON_INTERPRET=1), else the dequantised weight through kernels.linear. The CPU engine
instead packs the int8 weight for csrc/quant_cpu.cpp (kernels.decode.pack_linear).
kernels.reference.quantize_int8 / dequantize_int8 / linear_int8 define the arithmetic.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks as C
from . import _dispatch as dispatch
from . import reference
from .gemm import _ACT_IDS, linear


class QuantizedWeight(NamedTuple):
    """An (N, K) weight as int8 values q (N, K) and fp32 scales (N, K // group_size); group_size K:
    one scale per output channel."""
    q: torch.Tensor
    scale: torch.Tensor
    group_size: int

    @property
    def shape(self):
        return self.q.shape


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """weight (N, K) float -> QuantizedWeight: per output channel (group_size None), or per group of
    group_size consecutive inputs (group_size must divide K; 32 to 128 are the usual sizes)."""
    C.tensor("weight", weight, 2)
    k = weight.shape[1]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1 or k % group_size):
        raise ValueError(f"group_size must be None (per output channel) or a positive divisor of the weight's "
                         f"{k} input features, got {group_size!r}")
    if k == 0:
        raise ValueError("weight has no input features (K = 0)")
    with torch.no_grad():
        q, scale = reference.quantize_int8(weight, group_size)
    return QuantizedWeight(q, scale, group_size or k)


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight w stands for, float(q) * scale in fp32, cast to dtype."""
    _check_weight(w)
    return reference.dequantize_int8(w.q, w.scale).to(dtype)


def _check_weight(w):
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"w must be a QuantizedWeight from quantize_int8, got {type(w).__name__}")
    C.tensor("w.q", w.q, 2, dtypes=(torch.int8,))
    C.tensor("w.scale", w.scale, 2, dtypes=(torch.float32,))
    n, k = w.q.shape
    if w.scale.shape[0] != n or w.scale.shape[1] * w.group_size != k or w.scale.device != w.q.device:
        raise ValueError(f"w.scale {tuple(w.scale.shape)} on {w.scale.device} does not fit q {tuple(w.q.shape)} "
                         f"on {w.q.device} in groups of {w.group_size}")


def linear_int8(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, activation=None):
    """kernels.linear(x, dequantize(w), bias, activation): x (..., K) -> (..., N) in x's dtype.
    Inference only (no gradient reaches the int8 weight)."""
    _check_weight(w)
    C.tensor("x", x)
    if activation not in _ACT_IDS:
        raise ValueError(f"activation must be one of {list(_ACT_IDS)}, got {activation!r}")
    n, k = w.q.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be (..., {k}) for a ({n}, {k}) weight, got {tuple(x.shape)}")
    if x.device != w.q.device:
        raise ValueError(f"x is on {x.device} but w is on {w.q.device}")
    if bias is not None:
        C.tensor("bias", bias, 1)
        C.same("x", x, bias=bias)
        if bias.shape[0] != n:
            raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    if dispatch.triton_w8a16(x):
        from .triton_w8a16 import w8a16
        x2 = x.reshape(-1, k).contiguous()
        y = w8a16(x2, w.q.contiguous(), w.scale.contiguous(), bias, _ACT_IDS[activation])
        return y.view(*x.shape[:-1], n)
    return linear(x, dequantize(w, x.dtype), bias, activation)


def linear_w8a8(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, activation=None):
    """act(x @ w^T + bias) with x quantised per 32 inputs to int8 as well (kernels.reference.linear_w8a8):
    the w8a8 arithmetic off the packed CPU kernel (kernels.decode.pack_linear(..., int8_activations=True)),
    in torch. x (..., K) float32 -> (..., N). Inference only."""
    _check_weight(w)
    C.tensor("x", x, dtypes=(torch.float32,))
    n, k = w.q.shape
    if x.dim() == 0 or x.shape[-1] != k or k % 32 or w.group_size % 32:
        raise ValueError(f"x must be (..., {k}) with {k} and the group size ({w.group_size}) multiples of 32, "
                         f"got {tuple(x.shape)}")
    if activation not in _ACT_IDS:
        raise ValueError(f"activation must be one of {list(_ACT_IDS)}, got {activation!r}")
    y = reference.linear_w8a8(x.detach(), w.q, w.scale, None if bias is None else bias.detach(), activation)
    return y.float()
