"""The CPU inference GEMM on weights packed once into the layout it streams.

kernel (csrc/linear_cpu.cpp fp32; csrc/quant_cpu.cpp bf16, int8 and w8a8, widened in registers)
-> packing (pack_linear, once per weight; its inverses unpack_linear and packed_rows) -> public
function packed_linear. Inference only (fp32 CPU activations and compute, no autograd) and eager
only (kernels._dispatch keeps torch.compile'd code on the torch paths), so no custom op: one
would only add dispatcher time to every decode call. The extension's entry points check their
own arguments (csrc/checks.cpp).
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import _dispatch as dispatch
from ._ext import ext
from .gemm import _ACT_IDS
from .weights import PackedLinear, QuantizedWeight


def pack_linear(weight, panel: int = 0, int8_activations: bool = False) -> PackedLinear | None:
    """A copy of weight (N, K) in the CPU decode GEMM's layout (a snapshot), or None where that
    kernel cannot run it (not on CPU, or no gpt_engine.kernels._C). The weight's format is kept:
    float32, bfloat16 (widened in registers), or a QuantizedWeight (int8 with its scales,
    dequantised in registers); the GEMM runs in fp32 either way. int8_activations (a
    QuantizedWeight with K and its group in multiples of 32): the GEMM quantises x too and sums
    integer dot products (kernels.reference.linear_w8a8; AVX-512 VNNI where the CPU has it). panel:
    one of gpt_engine.kernels._C.linear_panels() (0: the fastest on this CPU)."""
    quant = isinstance(weight, QuantizedWeight)
    w = weight.q if quant else weight
    if quant:
        C.tensors(**{"w.q": w, "w.scale": weight.scale})
        C.check("pack_linear", w, weight.scale, weight.group_size, int8_activations)
    else:
        C.tensors(weight=w)
        C.check("pack_linear", w, None, 0, int8_activations)
    if not dispatch.cpu_packed_weight(w):
        return None
    width = ext().check_panel(panel)
    with torch.no_grad():
        if w.dtype == torch.float32:
            return PackedLinear(ext().linear_pack(w, width), w.shape[0])
        return PackedLinear(_pack_low(weight, width, int8_activations), w.shape[0])


def _panels(t: torch.Tensor, width: int) -> torch.Tensor:
    """(N, ...) -> (ceil(N / width), width, ...), rows past N zero."""
    n = t.shape[0]
    p = -(-n // width)
    out = t.new_zeros((p * width, *t.shape[1:]))
    out[:n] = t
    return out.view(p, width, *t.shape[1:])


def _pack_low(weight, width: int, int8_activations: bool = False) -> torch.Tensor:
    """csrc/quant_cpu.h's layouts. bf16 (N, K) -> (P, K, width), as the fp32 panels. QuantizedWeight ->
    (P, ng, 4 + G, width) int8: per panel and group the rows' fp32 scales (as 4 x width bytes), then the
    group's G x width values, k-major; with int8_activations, uint8: the values as q + 128 in G / 4
    quads of (width, 4), each column's four consecutive inputs together."""
    if isinstance(weight, torch.Tensor):
        return _panels(weight.contiguous(), width).transpose(1, 2).contiguous()
    q, scale, g = weight
    n, k = q.shape
    ng = k // g
    qp = _panels(q.contiguous(), width).view(-1, width, ng, g).permute(0, 2, 3, 1)  # (P, ng, G, width)
    if int8_activations:
        qp = (qp.to(torch.int16) + 128).to(torch.uint8)
        qp = qp.reshape(-1, ng, g // 4, 4, width).transpose(3, 4).reshape(-1, ng, g, width)
    sp = _panels(scale.float().contiguous(), width).permute(0, 2, 1).contiguous()  # (P, ng, width) fp32
    sb = sp.view(qp.dtype).reshape(-1, ng, 4, width)  # each group's width scales as 4 x width bytes, in order
    return torch.cat([sb, qp], dim=2).contiguous()


def _low_values(t: torch.Tensor) -> torch.Tensor:
    """A packed int8 / uint8 weight's (P, ng, G, width) int8 values, k-major, from either layout."""
    p, ng, rows, width = t.shape
    v = t[:, :, 4:]
    if t.dtype == torch.uint8:
        v = v.reshape(p, ng, (rows - 4) // 4, width, 4).transpose(3, 4).reshape(p, ng, rows - 4, width)
        v = (v.to(torch.int16) - 128).to(torch.int8)
    return v


def _packed(w):
    if not isinstance(w, PackedLinear):
        raise TypeError(f"w must be a PackedLinear from pack_linear, got {type(w).__name__}")


def unpack_linear(w: PackedLinear):
    """The weight pack_linear packed, in its format: a float (N, K) tensor, or a QuantizedWeight
    (int8 values and fp32 scales). A new tensor (not a view of the pack): for a path without the
    packed kernel when the pack is the weight's only copy."""
    _packed(w)
    t, n = w.weight, w.n
    if t.dim() == 3:  # (P, K, width) float panels
        p, k, width = t.shape
        return t.permute(0, 2, 1).reshape(p * width, k)[:n].contiguous()
    p, ng, rows, width = t.shape
    g = rows - 4
    scale = t[:, :, :4].reshape(p, ng, 4 * width).contiguous().view(torch.float32)  # (P, ng, width)
    scale = scale.permute(0, 2, 1).reshape(p * width, ng)[:n].contiguous()
    q = _low_values(t).permute(0, 3, 1, 2).reshape(p * width, ng * g)[:n].contiguous()
    return QuantizedWeight(q, scale, g)


def packed_rows(w: PackedLinear, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids (...) of the weight pack_linear packed, dequantised to float32: (..., K). A tied
    embedding's lookup when the packed head is its only copy; reads len(ids) rows, not the pack."""
    _packed(w)
    C.tensors(ids=ids)
    return ext().packed_rows(w.weight, ids, w.n)


def packed_linear(x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None = None, activation=None):
    """kernels.linear(x, weight, bias, activation) for CPU float32 inference on pack_linear(weight):
    x (..., K) -> (..., N)."""
    _packed(w)
    if activation not in _ACT_IDS:
        raise ValueError(f"activation must be one of {list(_ACT_IDS)}, got {activation!r}")
    C.tensors(x=x)
    if bias is not None:
        C.tensors(bias=bias)
    return ext().linear_packed(x, w.weight, bias, w.n, _ACT_IDS[activation])
