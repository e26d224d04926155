"""gpt_engine.kernels: every op the engine uses. Fused attention (Triton; paged decode and the CPU
prefill in gpt_engine.kernels._C), norms and GEMMs (gpt_engine.kernels._C), int8 GEMMs, and the CPU
decode path (packed GEMMs, RoPE, gated MLPs, a whole decode layer), each with a PyTorch twin in
gpt_engine.kernels.reference. One op file per op family, each kernel -> launcher -> custom op
(where torch.compile or autograd needs one) -> public function; the argument rules are
csrc/checks.cpp's, run through kernels/_checks.py.

The repository's kernels/ folder installs as `gpt_engine.kernels` (pyproject.toml's package-dir);
no top-level `kernels` module is installed: Hugging Face's `kernels` package owns that name.
Importing this package is cheap and has no side effects: the ops load on first attribute access.
"""
import importlib

_OPS = {
    "flash_attention": "attention",
    "flash_attention_varlen": "attention",
    "paged_attention": "paged",
    "store_kvcache": "paged",
    "layer_norm": "norm",
    "rms_norm": "norm",
    "linear": "gemm",
    "quantize_int8": "quant",
    "dequantize": "quant",
    "linear_int8": "quant",
    "linear_w8a8": "quant",
    "pack_linear": "packed",
    "unpack_linear": "packed",
    "packed_rows": "packed",
    "packed_linear": "packed",
    "rope_": "rotary",
    "glu": "glu",
    "lora_add_": "lora",
    "apply_token_bitmask_": "bitmask",
    "decode_layer": "decode",
    "decode_layer_applies": "decode",
    "pack_layer": "decode",
    "QuantizedWeight": "weights",
    "PackedLinear": "weights",
    "PackedLayer": "weights",
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
