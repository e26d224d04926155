"""Rotary position embedding applied in place, for CPU float32 inference.

kernel (csrc/rope_cpu.cpp) -> public function rope_; the extension's entry point checks the
arguments (csrc/checks.cpp) and shapes them. Inference and eager only, like kernels.packed, so
no custom op.
"""
from __future__ import annotations

import torch

from . import _checks as C
from ._ext import ext


def rope_(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """In place, HF rotate_half form: the first `heads` heads of t (..., heads', D), CPU float32,
    rotated by cos, sin (..., R/2) at each row's position, in one pass rather than torch's
    chunk/cat form. R <= D: partial rotary (GPT-NeoX's rotary_pct, Phi) rotates each head's first R
    dims as halves [0, R/2) and [R/2, R) and leaves [R, D). Returns t
    (kernels.reference.rope is its twin)."""
    C.tensors(t=t, cos=cos, sin=sin)
    ext().rope_(t, cos, sin, int(heads))
    return t
