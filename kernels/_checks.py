"""Argument checks shared by the public ops: wrong input raises ValueError/TypeError naming it."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name, x, ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def same(ref_name, ref, **others):
    """Every tensor in `others` shares ref's device and dtype."""
    for name, x in others.items():
        if x is None:
            continue
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def int_tensor(name, x, ndim, device):
    tensor(name, x, ndim, dtypes=(torch.int32,))
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x

