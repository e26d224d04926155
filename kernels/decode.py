"""One pre-norm decoder layer of a CPU decode step in a single call into gpt_engine.kernels._C.

The engine's decode step on CPU runs ~10 kernel calls per layer, and on small models their
Python wrappers (argument checks, dispatch) are a large share of the step. csrc/decode_cpu.cpp's
decode_layer runs the same kernels back to back from C++ with the same checks there.
Its GEMMs run on weights packed once (pack_layer) into the layout the CPU kernel streams
(csrc/linear_cpu.cpp; bf16 and int8 weights: csrc/quant_cpu.cpp, widened in registers). Inference
only: fp32 CPU activations and compute, no autograd.
kernels.reference.decode_layer (on the unpacked weights) is its twin.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks as C
from . import _dispatch as dispatch
from ._ext import ext
from .gemm import _ACT_IDS

ACTIVATIONS = (*_ACT_IDS, "swiglu")  # swiglu: fc yields [gate | up], the MLP takes silu(gate) * up
GEMMS = (2, 4, 8, 10)  # the weights of qkv, proj, fc and fc2 among a layer's 12 tensors


def decode_layer_applies(x: torch.Tensor, weights) -> bool:
    """Whether the CPU inference kernels here (decode_layer, packed_linear, swiglu) serve x and
    weights (kernels._dispatch.cpu_decode_layer)."""
    return dispatch.cpu_decode_layer(x, weights)


class PackedLinear(NamedTuple):
    """A weight (N, K) rearranged for the CPU kernel by pack_linear; n = N."""
    weight: torch.Tensor
    n: int


def pack_linear(weight, panel: int = 0, int8_activations: bool = False) -> PackedLinear | None:
    """A copy of weight (N, K) in the CPU decode GEMM's layout (a snapshot), or None where that
    kernel cannot run it (not on CPU, or no gpt_engine.kernels._C). The weight's format is kept:
    float32, bfloat16 (widened in registers), or a kernels.quant.QuantizedWeight (int8 with its
    scales, dequantised in registers); the GEMM runs in fp32 either way. int8_activations (a
    QuantizedWeight with K and its group in multiples of 32): the GEMM quantises x too and sums
    integer dot products (kernels.reference.linear_w8a8; AVX-512 VNNI where the CPU has it). panel:
    one of gpt_engine.kernels._C.linear_panels() (0: the fastest on this CPU)."""
    from .quant import QuantizedWeight  # a light module, imported only here to keep this import cheap
    quant = isinstance(weight, QuantizedWeight)
    w = weight.q if quant else weight
    C.tensor("weight", w, 2, dtypes=(torch.int8,) if quant else C.FLOAT_DTYPES)
    if int8_activations and not (quant and w.shape[1] % 32 == 0 and weight.group_size % 32 == 0):
        raise ValueError("int8_activations needs a QuantizedWeight whose K and group size are multiples of 32")
    if not dispatch.cpu_packed_weight(w):
        return None
    panels = ext().linear_panels()
    width = panel or panels[0]
    if width not in panels:
        raise ValueError(f"panel must be 0 or one of this CPU's {panels}, got {panel}")
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


def unpack_linear(w: PackedLinear):
    """The weight pack_linear packed, in its format: a float (N, K) tensor, or a QuantizedWeight
    (int8 values and fp32 scales). A new tensor (not a view of the pack): for a path without the
    packed kernel when the pack is the weight's only copy."""
    if not isinstance(w, PackedLinear):
        raise TypeError(f"w must be a PackedLinear from pack_linear, got {type(w).__name__}")
    t, n = w.weight, w.n
    if t.dim() == 3:  # (P, K, width) float panels
        p, k, width = t.shape
        return t.permute(0, 2, 1).reshape(p * width, k)[:n].contiguous()
    from .quant import QuantizedWeight
    p, ng, rows, width = t.shape
    g = rows - 4
    scale = t[:, :, :4].reshape(p, ng, 4 * width).contiguous().view(torch.float32)  # (P, ng, width)
    scale = scale.permute(0, 2, 1).reshape(p * width, ng)[:n].contiguous()
    q = _low_values(t).permute(0, 3, 1, 2).reshape(p * width, ng * g)[:n].contiguous()
    return QuantizedWeight(q, scale, g)


def packed_rows(w: PackedLinear, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids (...) of the weight pack_linear packed, dequantised to float32: (..., K). A tied
    embedding's lookup when the packed head is its only copy; reads len(ids) rows, not the pack."""
    if not isinstance(w, PackedLinear):
        raise TypeError(f"w must be a PackedLinear from pack_linear, got {type(w).__name__}")
    C.tensor("ids", ids, dtypes=(torch.int64, torch.int32))
    rows = ext().packed_rows(w.weight, ids.reshape(-1).long().contiguous(), w.n)
    return rows.view(*ids.shape, rows.shape[1])


def packed_linear(x: torch.Tensor, w: PackedLinear, bias: torch.Tensor | None = None, activation=None):
    """kernels.linear(x, weight, bias, activation) for CPU float32 inference on pack_linear(weight):
    x (..., K) -> (..., N)."""
    if not isinstance(w, PackedLinear):
        raise TypeError(f"w must be a PackedLinear from pack_linear, got {type(w).__name__}")
    if activation not in _ACT_IDS:
        raise ValueError(f"activation must be one of {list(_ACT_IDS)}, got {activation!r}")
    if x.dim() == 0 or x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"x must be a CPU float32 tensor (..., K), got {tuple(x.shape)} {x.dtype} on {x.device}")
    y = ext().linear_packed(x.reshape(-1, x.shape[-1]).contiguous(), w.weight, bias, w.n, _ACT_IDS[activation])
    return y.view(*x.shape[:-1], w.n)


class PackedLayer(NamedTuple):
    """A layer's 12 tensors as decode_layer takes them, from pack_layer: the four GEMM weights
    (qkv, proj, fc, fc2) rearranged for the CPU kernel, n their output features."""
    tensors: tuple
    n: tuple


def pack_layer(weights) -> PackedLayer | None:
    """weights: norm1 w, b | qkv w, b | proj w, b | norm2 w, b | fc w, b | fc2 w, b (biases may be
    None; a GEMM weight may be given already packed, as a PackedLinear) -> the PackedLayer
    decode_layer runs, or None where it cannot (not CPU float32, or no gpt_engine.kernels._C). The GEMM
    weights are copied: a snapshot, to pack again after changing them."""
    if len(weights) != 12:
        raise ValueError(f"weights must hold the layer's 12 tensors, got {len(weights)}")
    t = list(weights)
    for i in GEMMS:
        t[i] = t[i] if isinstance(t[i], PackedLinear) else pack_linear(t[i])
        if t[i] is None:
            return None
    if any(w is not None and i not in GEMMS and (w.device.type != "cpu" or w.dtype != torch.float32)
           for i, w in enumerate(t)):
        return None
    return PackedLayer(tuple(w.weight if i in GEMMS else w for i, w in enumerate(t)), tuple(t[i].n for i in GEMMS))


def swiglu(f: torch.Tensor) -> torch.Tensor:
    """f (..., 2 ff) = [gate | up] -> silu(gate) * up (..., ff) in one pass: CPU float32."""
    if f.device.type != "cpu" or f.dtype != torch.float32 or f.dim() == 0 or f.shape[-1] % 2:
        raise ValueError(f"swiglu takes a CPU float32 tensor of even width, got {tuple(f.shape)} {f.dtype} on "
                         f"{f.device}")
    y = ext().swiglu(f.reshape(-1, f.shape[-1]).contiguous())
    return y.view(*f.shape[:-1], f.shape[-1] // 2)


def rope_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """In place, HF rotate_half form: the first `heads` heads of t (..., heads', D), CPU float32,
    rotated by cos, sin (..., D/2) at each row's position, in one pass rather than torch's
    chunk/cat form. Returns t."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() < 2 or not t.is_contiguous():
        raise ValueError(f"rope_ takes a contiguous CPU float32 (..., heads, D) tensor, got {tuple(t.shape)} "
                         f"{t.dtype} on {t.device}")
    n = t.numel() // (t.shape[-2] * t.shape[-1]) if t.numel() else 0
    ext().rope_(t.view(n, t.shape[-2], t.shape[-1]), cos.reshape(n, -1).contiguous(),
                sin.reshape(n, -1).contiguous(), int(heads))
    return t


def decode_layer(x, residual, layer: PackedLayer, k_cache, v_cache, slot_mapping, block_table, seq_lens, rope,
                 n_head: int, eps: float, rms: bool, activation, softmax_scale: float, window_size=(-1, -1)):
    """x (B, C) entering the layer; residual (B, C) or None in the first layer (x is the stream);
    layer from pack_layer; rope None or (cos, sin) each (B, D/2) at the tokens' positions;
    window_size (left, right) as in paged_attention (a sliding-window layer sees its last left + 1
    keys). Writes the new K/V at slot_mapping. Returns (x, residual) for the next layer."""
    if not isinstance(layer, PackedLayer):
        raise TypeError(f"layer must be a PackedLayer from pack_layer, got {type(layer).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    left = C.window(window_size)[0]
    if not dispatch.cpu_inference(x):  # the pack's tensors were checked by pack_layer
        raise ValueError("decode_layer runs CPU float32 inference (no grad, not under TRITON_INTERPRET=1) with "
                         "contiguous weights and gpt_engine.kernels._C built")
    cos, sin = rope if rope is not None else (None, None)
    act = 4 if activation == "swiglu" else _ACT_IDS[activation]
    x, residual = ext().decode_layer(x.contiguous(), None if residual is None else residual.contiguous(),
                                     list(layer.tensors), list(layer.n), k_cache, v_cache, slot_mapping, block_table,
                                     seq_lens, cos, sin, int(n_head), float(eps), bool(rms), act,
                                     float(softmax_scale), left)
    return x, residual
