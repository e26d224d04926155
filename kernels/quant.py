"""int8 weight-only quantisation (symmetric, per output channel or per group along K) and its GEMMs.

quantize_int8 runs once, at load time, into a kernels.weights.QuantizedWeight. linear_int8 is
kernels.linear on the dequantised weight: kernel (the Triton w8a16 kernel, triton_w8a16.py) ->
public function, for decode-sized batches on CUDA (and on CPU tensors under TRITON_INTERPRET=1),
else the dequantised weight through kernels.linear. linear_w8a8 quantises the activations too,
in torch (the packed CPU kernel is kernels.packed.pack_linear(..., int8_activations=True)).
Inference only (no autograd) and run eagerly by the engine, so no custom op.
kernels.reference.quantize_int8 / dequantize_int8 / linear_int8 / linear_w8a8 define the
arithmetic; the argument rules are csrc/checks.cpp's (kernels/_checks.py).
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import _dispatch as dispatch
from . import reference
from .gemm import _ACT_IDS, linear
from .weights import QuantizedWeight


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """weight (N, K) float -> QuantizedWeight: per output channel (group_size None), or per group of
    group_size consecutive inputs (group_size must divide K; 32 to 128 are the usual sizes)."""
    C.tensors(weight=weight)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"group_size must be None (per output channel) or a positive divisor of the weight's "
                         f"input features, got {group_size!r}")
    C.check("quantize", weight, group_size or 0)
    with torch.no_grad():
        q, scale = reference.quantize_int8(weight, group_size)
    return QuantizedWeight(q, scale, group_size or weight.shape[1])


def _weight(w):
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"w must be a QuantizedWeight from quantize_int8, got {type(w).__name__}")
    C.tensors(**{"w.q": w.q, "w.scale": w.scale})


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight w stands for, float(q) * scale in fp32, cast to dtype."""
    _weight(w)
    C.check("quantized", w.q, w.scale, w.group_size)
    return reference.dequantize_int8(w.q, w.scale).to(dtype)


def _args(x, w, bias, activation):
    _weight(w)
    C.tensors(x=x)
    if bias is not None:
        C.tensors(bias=bias)
    if activation not in _ACT_IDS:
        raise ValueError(f"activation must be one of {list(_ACT_IDS)}, got {activation!r}")


def linear_int8(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, activation=None):
    """kernels.linear(x, dequantize(w), bias, activation): x (..., K) -> (..., N) in x's dtype.
    Inference only (no gradient reaches the int8 weight)."""
    _args(x, w, bias, activation)
    C.check("linear_int8", x, w.q, w.scale, w.group_size, bias)
    if dispatch.triton_w8a16(x):
        from .triton_w8a16 import w8a16
        n, k = w.q.shape
        y = w8a16(x.reshape(-1, k).contiguous(), w.q.contiguous(), w.scale.contiguous(), bias, _ACT_IDS[activation])
        return y.view(*x.shape[:-1], n)
    return linear(x, reference.dequantize_int8(w.q, w.scale).to(x.dtype), bias, activation)


def linear_w8a8(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, activation=None):
    """act(x @ w^T + bias) with x quantised per 32 inputs to int8 as well (kernels.reference.linear_w8a8):
    the w8a8 arithmetic off the packed CPU kernel (kernels.packed.pack_linear(..., int8_activations=True)),
    in torch. x (..., K) float32 -> (..., N). Inference only."""
    _args(x, w, bias, activation)
    C.check("linear_w8a8", x, w.q, w.scale, w.group_size, bias)
    y = reference.linear_w8a8(x.detach(), w.q, w.scale, None if bias is None else bias.detach(), activation)
    return y.float()
