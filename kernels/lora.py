"""Each token's LoRA update of a GEMM's output, then the GEMM's activation, in place, for CPU float32
inference (S-LoRA's gathered form: every token meets its own adapter only).

kernel (csrc/lora_cpu.cpp) -> public function lora_add_; the extension's entry point checks the
arguments (csrc/kernel_checks.cpp). Inference and eager only, like kernels.glu, so no custom op.
kernels.reference.lora_add_ is its twin; engine/models/lora.py's torch forms serve other devices.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._ext import ext
from .gemm import _ACT_IDS


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
              activation=None) -> torch.Tensor:
    """y (M, N) += x[i] @ a[s]^T @ b[s] for each token i whose slot s = slots[i] is not -1, then
    activation (None, "gelu", "gelu_tanh", "relu") over all of y -> y. x (M, K); a (L, W, K) and
    b (L, W, N) an adapted GEMM's slot tensors; slots (M,) int64 in [-1, L). CPU float32."""
    if activation not in _ACT_IDS:
        raise ValueError(f"activation must be one of {list(_ACT_IDS)}, got {activation!r}")
    C.tensors(y=y, x=x, a=a, b=b, slots=slots)
    ext().lora_add_(y, x, a, b, slots, _ACT_IDS[activation])
    return y
