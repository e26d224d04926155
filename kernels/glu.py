"""SwiGLU's gate, silu(gate) * up, in one pass, for CPU float32 inference.

kernel (csrc/rope_cpu.cpp's swiglu_cpu) -> public function swiglu; the extension's entry point
checks the argument (csrc/checks.cpp) and shapes it. Inference and eager only, like
kernels.packed, so no custom op.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._ext import ext


def swiglu(f: torch.Tensor) -> torch.Tensor:
    """f (..., 2 ff) = [gate | up] -> silu(gate) * up (..., ff) in one pass: CPU float32."""
    C.tensors(f=f)
    return ext().swiglu(f)


def glu(f, activation="silu"):  # TEMP until the decodetraits merge
    if activation == "silu":
        return swiglu(f)
    gate, up = f.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
