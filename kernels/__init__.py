"""gpt_engine.kernels: fused attention (Triton), norms and GEMM (gpt_engine.kernels._C), each
with a PyTorch twin in gpt_engine.kernels.reference.

The repository's kernels/ folder installs as `gpt_engine.kernels` (pyproject.toml's package-dir);
no top-level `kernels` module is installed: Hugging Face's `kernels` package owns that name.
Importing this package is cheap and has no side effects: the ops load on first attribute access.
"""
import importlib

_OPS = {
    "flash_attention": "attention",
    "flash_attention_varlen": "attention",
    "paged_attention": "paged",
    "layer_norm": "norm",
    "rms_norm": "norm",
    "linear": "gemm",
    "store_kvcache": "paged",
    "decode_layer": "decode",
    "decode_layer_applies": "decode",
    "pack_layer": "decode",
    "pack_linear": "decode",
    "packed_linear": "decode",
    "packed_rows": "decode",
    "rope_": "decode",
    "swiglu": "decode",
    "unpack_linear": "decode",
    "QuantizedWeight": "quant",
    "dequantize": "quant",
    "linear_int8": "quant",
    "linear_w8a8": "quant",
    "quantize_int8": "quant",
    "cpu_inference": "_dispatch",
    "triton_w8a16": "_dispatch",
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
