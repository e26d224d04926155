"""Argument checks of the public ops: wrong input raises ValueError/TypeError naming it.

The rules on tensors (shapes, dtypes, devices, index values) are written once, in csrc/checks.cpp.
The C++ entry points run them before their kernels; `check` runs an op's rules through the
bindings (gpt_engine.kernels._C.check_<op>) before its Triton and torch paths. Here live only the
rules on Python objects that the bindings cannot take: a tensor argument that is no tensor at all,
and window_size's form.

Index values (block tables, slots, sequence offsets) are checked against the cache by the C++ CPU
kernels always, and on the other paths only with GPT_ENGINE_DEBUG_CHECKS=1 (read at each call):
reading them costs a device sync, and on CUDA a bad index is silent memory corruption.

Under torch.compile tracing `check` runs nothing (dynamo cannot trace into the extension): the ops
that wrap Triton kernels then check inside their custom op, at run time. Without the extension
(it failed to import, with a warning) the ops fall back to torch unchecked, and torch's own
errors stand in for these.
"""
from __future__ import annotations

import os

import torch

from ._ext import KV_FP8, ext


def tensors(**named):
    """Each argument a torch.Tensor (None where the op takes None is left to the caller)."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def scales(k_scale, v_scale, cache=None):
    """A quantised KV cache's scales: tensors or None (their shape and dtype are the op's rules). An fp8
    cache needs them as an int8 one does (the op's rules see it as int8 bytes: kv_bytes)."""
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if isinstance(cache, torch.Tensor) and cache.dtype == KV_FP8 and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 (torch.float8_e4m3fn) KV cache needs k_scale and v_scale")


def kv_bytes(k_cache, v_cache):
    """An fp8 cache pair as the int8 pair over the same bytes, for csrc/checks.cpp's rules: they know int8's
    (one fp32 scale per row, its shape), which are fp8's too, but not fp8 itself, which no C++ kernel reads
    (kernels._dispatch keeps it from them)."""
    if k_cache.dtype == v_cache.dtype == KV_FP8:
        return k_cache.view(torch.int8), v_cache.view(torch.int8)
    return k_cache, v_cache


def window(window_size):
    """window_size (left, right): a pair of ints -> (left, right); their range is checked with the op's rules."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def band(window_size, causal):
    """The keys query i sees, as offsets from its diagonal i + Sk - Sq: (left, right), -1 unbounded.
    Causal is the band's right edge at 0, whatever window_size says on the right (FlashAttention's rule)."""
    left, right = window(window_size)
    return left, 0 if causal else right


def check(op: str, *args) -> bool:
    """Run op's rules (csrc/checks.cpp's check_<op>) on args; whether they ran (not while torch.compile
    traces, not without the extension)."""
    if torch.compiler.is_compiling():
        return False
    m = ext()
    if m is None:
        return False
    getattr(m, "check_" + op)(*args)
    return True


# ---- index values (debug mode), by the rules the C++ kernels apply to their own input

def debug_checks() -> bool:
    """GPT_ENGINE_DEBUG_CHECKS=1: the public ops check index values on the paths without the C++ checks."""
    return os.environ.get("GPT_ENGINE_DEBUG_CHECKS") == "1"


def _host(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # a capture cannot sync; the runner then decodes eagerly, where every call is checked
        raise RuntimeError("GPT_ENGINE_DEBUG_CHECKS=1 reads indices on the host, which a CUDA graph capture "
                           "cannot do")
    return x.detach().cpu()


def paged_indices(block_table, seq_lens, k_cache):
    """paged_attention: seq_lens[b] in [1, max_blocks * block_size], and the blocks they cover exist."""
    check("paged_indices", _host(block_table), _host(seq_lens), k_cache.shape[0], k_cache.shape[1])


def slot_indices(slot_mapping, k_cache):
    """store_kvcache: each slot in [-1, num_blocks * block_size) (-1 skips a token)."""
    check("slot_indices", _host(slot_mapping), k_cache.shape[0] * k_cache.shape[1])


def varlen_indices(cu_seqlens_q, cu_seqlens_k, q, k, block_table=None):
    """flash_attention_varlen: the offsets rise from 0 within q's rows (and k's when packed); with
    block_table, each sequence's cached keys fit its table row and the blocks they cover exist."""
    paged = block_table is not None
    check("varlen_indices", _host(cu_seqlens_q), _host(cu_seqlens_k), q.shape[0], -1 if paged else k.shape[0],
          _host(block_table) if paged else None, k.shape[0], k.shape[1] if paged else 0)
