"""A gated MLP's act(gate) * up in one pass, for CPU float32 inference: SwiGLU (silu, llama) and
GeGLU (tanh GELU, Gemma).

kernel (csrc/rope_cpu.cpp's glu_cpu) -> public function glu; the extension's entry point checks
the argument (csrc/checks.cpp) and shapes it. Inference and eager only, like kernels.packed, so
no custom op. kernels.reference.glu is its twin.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._ext import ext

ACTIVATIONS = ("silu", "gelu_tanh")


def glu(f: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """f (..., 2 ff) = [gate | up] -> act(gate) * up (..., ff) in one pass: CPU float32. activation:
    "silu" (SwiGLU) or "gelu_tanh" (GeGLU: F.gelu(gate, approximate="tanh"))."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    C.tensors(f=f)
    return ext().glu(f, activation == "gelu_tanh")
