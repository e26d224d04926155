"""gpt-engine kernels: fused attention (Triton), norms and GEMM (kernels._C), each with a
PyTorch twin in kernels.reference.

Importing this package is cheap and has no side effects (transformers probes a module of
this name at import time): the ops load on first attribute access.
"""
import importlib

_OPS = {
    "flash_attention": "attention",
    "flash_attention_varlen": "attention",
    "paged_attention": "paged",
    "layer_norm": "norm",
    "rms_norm": "norm",
    "linear": "gemm",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        fn = getattr(importlib.import_module(f"{__name__}.{_OPS[name]}"), name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
