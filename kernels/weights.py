"""The weight formats the ops take besides plain tensors (NamedTuples, no torch work at import).

QuantizedWeight: int8 values and fp32 scales (kernels.quant.quantize_int8 makes one).
PackedLinear: a weight rearranged for the CPU GEMM (kernels.packed.pack_linear).
PackedLayer: a decoder layer's tensors as decode_layer runs them (kernels.decode.pack_layer).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizedWeight(NamedTuple):
    """An (N, K) weight as int8 values q (N, K) and fp32 scales (N, K // group_size); group_size K:
    one scale per output channel."""
    q: torch.Tensor
    scale: torch.Tensor
    group_size: int

    @property
    def shape(self):
        return self.q.shape


class PackedLinear(NamedTuple):
    """A weight (N, K) rearranged for the CPU kernel by pack_linear; n = N."""
    weight: torch.Tensor
    n: int


class PackedLayer(NamedTuple):
    """A layer's 14 tensors as decode_layer takes them, from pack_layer (the q and k norms' weights
    last, None without them): the four GEMM weights (qkv, proj, fc, fc2) rearranged for the CPU
    kernel, n their output features."""
    tensors: tuple
    n: tuple
