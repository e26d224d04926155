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



def window(window_size):
    """window_size (left, right): a pair of ints >= -1 (-1: unbounded on that side) -> (left, right)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    return left, right


def band(window_size, causal):
    """The keys query i sees, as offsets from its diagonal i + Sk - Sq: (left, right), -1 unbounded.
    Causal is the band's right edge at 0, whatever window_size says on the right (FlashAttention's rule)."""
    left, right = window(window_size)
    return left, 0 if causal else right
