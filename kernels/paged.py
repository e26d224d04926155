"""Decode attention over a paged KV cache (one query token per sequence) and the cache write.

kernel (kernels/triton_paged.py, csrc/paged_cpu.cpp) -> launchers -> custom ops -> public
functions; inference only, so no autograd. The cache holds q's dtype, bfloat16, or a quantised
format with an fp32 scale per (slot, KV head): int8 or fp8 e4m3 (torch.float8_e4m3fn)
(kernels.reference.quantize_kv; kv_cache_dtype). The Triton and C++ kernels read and write those
formats directly, dequantising in registers (no dequantised copy of the cache), but the C++ ones
take no fp8; the torch path dequantises what it gathers. kernels._dispatch picks the path: Triton
on CUDA (and on CPU under TRITON_INTERPRET=1); CPU fp32/fp16/bf16 the C++ kernels; float64, an fp8
cache on CPU, or a build without gpt_engine.kernels._C plain torch. Eager calls run the launchers
directly; under torch.compile the public functions call the custom ops instead, which torch.compile
keeps whole (and which check their arguments at run time, where the traced public function could not).
The argument rules are csrc/checks.cpp's (kernels/_checks.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _dispatch as dispatch
from . import reference
from ._ext import ext
from .attention import _scale

# ---- launchers (Triton's are kernels/triton_paged.py's, imported on first use)


def _paged_sdpa(q, k_cache, v_cache, block_table, seq_lens, scale, left, k_scale, v_scale):
    """Decode in one batched SDPA (float64, or no gpt_engine.kernels._C): gathers every sequence's blocks into
    a dense padded (B, L) batch. q (B, H, D) -> (B, H, D)."""
    B, H, D = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    L = block_table.shape[1] * bs
    # table entries past a sequence's blocks are padding, any value (as in the kernels): read block 0
    used = torch.arange(0, L, bs, device=q.device)[None, :] < seq_lens[:, None]
    idx = block_table.masked_fill(~used, 0).long().flatten()
    k, v = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
    if k_scale is not None:  # int8 / fp8: the gathered rows dequantised
        k = reference.dequantize_kv(k, k_scale.index_select(0, idx))
        v = reference.dequantize_kv(v, v_scale.index_select(0, idx))
    k = k.to(q.dtype).view(B, L, hkv, D).transpose(1, 2)  # (B, Hkv, L, D)
    v = v.to(q.dtype).view(B, L, hkv, D).transpose(1, 2)
    pos = torch.arange(L, device=q.device)[None, :]
    mask = pos < seq_lens[:, None]  # (B, L)
    if left >= 0:  # the query is token seq_len - 1: it sees the last left + 1 keys
        mask = mask & (pos >= seq_lens[:, None] - 1 - left)
    # the H // Hkv query heads of a group act as its query rows: GQA without repeating K/V
    o = F.scaled_dot_product_attention(q.view(B, hkv, H // hkv, D), k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale)
    return o.reshape(B, H, D)


def _paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left, right, k_scale, v_scale):
    """Check (the C++ kernel's entry point checks for itself), route, run."""
    triton = dispatch.use_triton(q)
    if not triton and dispatch.cpu_paged_attention(q, k_cache, v_cache):
        q = q if dispatch.rows_dense(q) else q.contiguous()
        return ext().paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left, right, k_scale, v_scale)
    C.check("paged_attention", q, *C.kv_bytes(k_cache, v_cache), block_table, seq_lens, left, right, k_scale,
            v_scale)
    if C.debug_checks():
        C.paged_indices(block_table, seq_lens, k_cache)
    if triton:
        from .triton_paged import paged_attention_fwd
        return paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, scale, left, k_scale, v_scale)
    return _paged_sdpa(q, k_cache, v_cache, block_table, seq_lens, scale, left, k_scale, v_scale)


def _store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    triton = dispatch.use_triton(k)
    if not triton and dispatch.cpu_store_kvcache(k, v, k_cache, v_cache):
        ext().store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    C.check("store_kvcache", k, v, *C.kv_bytes(k_cache, v_cache), slot_mapping, k_scale, v_scale)
    if C.debug_checks():
        C.slot_indices(slot_mapping, k_cache)
    if triton:
        from .triton_paged import store_kvcache_fwd
        store_kvcache_fwd(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


# ---- custom ops: what torch.compile sees of the launchers


@torch.library.custom_op("gpt_engine::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, left: int, right: int, k_scale: Optional[torch.Tensor],
                        v_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return _paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left, right, k_scale, v_scale)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, left, right, k_scale, v_scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("gpt_engine::store_kvcache", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _store_kvcache_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor],
                      v_scale: Optional[torch.Tensor]) -> None:
    _store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_store_kvcache_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    return None


# ---- public functions

def paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None, window_size=(-1, -1),
                    k_scale=None, v_scale=None):
    """q (B, H, D); k_cache/v_cache (num_blocks, block_size, Hkv, D) in q's dtype, bfloat16, or int8 /
    float8_e4m3fn with k_scale/v_scale (num_blocks, block_size, Hkv) float32 (store_kvcache writes them);
    block_table (B, max_blocks) int32; seq_lens (B,) int32 counts each sequence's valid cached tokens,
    the current one included. window_size (left, right) as in flash_attention: the query is the
    last cached token, so it sees the last left + 1 keys (right has no key to act on), and only
    their blocks are read. Returns (B, H, D).
    """
    C.tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    C.scales(k_scale, v_scale, k_cache)
    left, right = C.window(window_size)
    args = (q, k_cache, v_cache, block_table, seq_lens, _scale(softmax_scale, q), left, right, k_scale, v_scale)
    if torch.compiler.is_compiling():
        return _paged_attention_op(*args)
    return _paged_attention(*args)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Write new tokens' keys/values into the paged caches, in place.

    k/v (N, Hkv, D); caches (num_blocks, block_size, Hkv, D) in k's dtype or bfloat16 (rounded to it), or
    int8 / float8_e4m3fn with k_scale/v_scale (num_blocks, block_size, Hkv) float32: each (token, head) row
    quantised symmetrically, its scale max |row| / 127 (int8) or / 448 (fp8) written beside it
    (kernels.reference.quantize_kv); slot_mapping (N,) int64 flat slot (block * block_size + offset), -1 to
    skip a token.
    """
    C.tensors(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    C.scales(k_scale, v_scale, k_cache)
    if torch.compiler.is_compiling():
        _store_kvcache_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        _store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
