"""gpt_engine.kernels._C, imported on first use (keeps `import kernels` cheap)."""
from __future__ import annotations

import functools
import warnings

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernels take
# the fp8 KV cache format: the Triton kernels and torch read it, the compiled CPU kernels do not
KV_FP8 = torch.float8_e4m3fn


@functools.lru_cache(maxsize=None)
def ext():
    """The compiled module, or None with one warning when it is missing (callers fall back to torch)."""
    try:
        from . import _C
        return _C
    except ImportError as e:
        warnings.warn(f"gpt_engine.kernels._C failed to import ({e}); its ops fall back to torch / kernels.reference, "
                      "without their argument checks",
                      RuntimeWarning)
        return None


def cuda_ext():
    """gpt_engine.kernels._C when it was built with CUDA, else None."""
    m = ext()
    return m if m is not None and m.has_cuda() else None
