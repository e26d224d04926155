"""Structured outputs' token mask over the sampler's logits, in place: token t of a row stays where bit
t % 32 of word t // 32 of its int32 mask is set (llguidance's layout), else -inf, as do tokens past the
mask's words.

kernel (csrc/bitmask_cpu.cpp) -> public function apply_token_bitmask_; the extension's entry point checks
the arguments (csrc/kernel_checks.cpp). CPU float32 with gpt_engine.kernels._C takes the kernel;
everything else (CUDA, other dtypes, a build without it) kernels.reference.apply_token_bitmask_.
Inference only, eager: no custom op.
"""
from __future__ import annotations

import torch

from . import _checks as C
from . import reference
from ._ext import ext


def apply_token_bitmask_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (B, V); rows (R,) int64, distinct rows of logits; bitmask (R, W) int32, row r's mask for
    logits[rows[r]] -> logits, masked in place."""
    C.tensors(logits=logits, rows=rows, bitmask=bitmask)
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
            and ext() is not None):
        ext().apply_token_bitmask_(logits, rows, bitmask)
        return logits
    return reference.apply_token_bitmask_(logits, rows, bitmask)
