"""LayerNorm and RMSNorm over the last dim, with an optional fused residual add."""
from __future__ import annotations

import torch

from . import _checks as C
from . import reference


def _check(x, weight, bias, residual):
    C.tensor("x", x), C.tensor("weight", weight, 1)
    if bias is not None:
        C.tensor("bias", bias, 1)
    if residual is not None:
        C.tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    C.same("x", x, residual=residual)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
        if p.shape[0] != x.shape[-1]:
            raise ValueError(f"{name} has {p.shape[0]} elements but x's last dim is {x.shape[-1]}")


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over x's last dim (fp32 statistics). With residual, returns
    (layer_norm(x + residual), x + residual) from one fused pass."""
    _check(x, weight, bias, residual)
    return reference.layer_norm(x, weight, bias, eps, residual)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over x's last dim (fp32 statistics). With residual, returns
    (rms_norm(x + residual), x + residual) from one fused pass."""
    _check(x, weight, None, residual)
    return reference.rms_norm(x, weight, eps, residual)
