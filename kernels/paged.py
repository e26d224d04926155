"""Decode attention over a paged KV cache (one query token per sequence) and the cache write.

kernel (kernels/triton_paged.py, csrc/paged_cpu.cpp) -> launchers -> public functions; inference
only, so no autograd. kernels._dispatch picks the path: Triton on CUDA (and on CPU under
TRITON_INTERPRET=1); CPU fp32/fp16/bf16 the C++ kernels; float64 or a build without
gpt_engine.kernels._C plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _dispatch as dispatch
from . import reference
from ._ext import ext
from .attention import _check_heads, _scale

# ---- launchers (Triton's are kernels/triton_paged.py's, imported on first use)

def _paged_sdpa(q, k_cache, v_cache, block_table, seq_lens, scale, left):
    """Decode in one batched SDPA (float64, or no gpt_engine.kernels._C): gathers every sequence's blocks into
    a dense padded (B, L) batch. q (B, H, D) -> (B, H, D)."""
    B, H, D = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    L = block_table.shape[1] * bs
    # table entries past a sequence's blocks are padding, any value (as in the kernels): read block 0
    used = torch.arange(0, L, bs, device=q.device)[None, :] < seq_lens[:, None]
    idx = block_table.masked_fill(~used, 0).long().flatten()
    k = k_cache.index_select(0, idx).view(B, L, hkv, D).transpose(1, 2)  # (B, Hkv, L, D)
    v = v_cache.index_select(0, idx).view(B, L, hkv, D).transpose(1, 2)
    pos = torch.arange(L, device=q.device)[None, :]
    mask = pos < seq_lens[:, None]  # (B, L)
    if left >= 0:  # the query is token seq_len - 1: it sees the last left + 1 keys
        mask = mask & (pos >= seq_lens[:, None] - 1 - left)
    # the H // Hkv query heads of a group act as its query rows: GQA without repeating K/V
    o = F.scaled_dot_product_attention(q.view(B, hkv, H // hkv, D), k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale)
    return o.reshape(B, H, D)


def _paged_cpu(q, k_cache, v_cache, block_table, seq_lens, scale, left):
    q = q if dispatch.rows_dense(q) else q.contiguous()
    return ext().paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left)


# ---- public functions

def paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None, window_size=(-1, -1)):
    """q (B, H, D); k_cache/v_cache (num_blocks, block_size, Hkv, D); block_table
    (B, max_blocks) int32; seq_lens (B,) int32 counts each sequence's valid cached tokens,
    the current one included. window_size (left, right) as in flash_attention: the query is the
    last cached token, so it sees the last left + 1 keys (right has no key to act on), and only
    their blocks are read. Returns (B, H, D).
    """
    C.tensor("q", q, 3), C.tensor("k_cache", k_cache, 4), C.tensor("v_cache", v_cache, 4)
    _check_heads(q, k_cache, v_cache)
    C.int_tensor("block_table", block_table, 2, q.device)
    C.int_tensor("seq_lens", seq_lens, 1, q.device)
    if block_table.shape[0] != q.shape[0] or seq_lens.shape[0] != q.shape[0]:
        raise ValueError(f"block_table rows ({block_table.shape[0]}) and seq_lens ({seq_lens.shape[0]}) "
                         f"must equal the batch size ({q.shape[0]})")
    scale = _scale(softmax_scale, q.shape[-1])
    left = C.window(window_size)[0]
    triton = dispatch.use_triton(q)
    cpu = not triton and dispatch.cpu_paged_attention(q, k_cache, v_cache)
    if not cpu and C.debug_checks():  # the C++ kernel checks the indices itself, always
        C.paged_indices(block_table, seq_lens, k_cache)
    if triton:
        from .triton_paged import paged_attention_fwd
        return paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, scale, left)
    if cpu:
        return _paged_cpu(q, k_cache, v_cache, block_table, seq_lens, scale, left)
    return _paged_sdpa(q, k_cache, v_cache, block_table, seq_lens, scale, left)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    """Write new tokens' keys/values into the paged caches, in place.

    k/v (N, Hkv, D); caches (num_blocks, block_size, Hkv, D); slot_mapping (N,) int64 flat slot
    (block * block_size + offset), -1 to skip a token.
    """
    C.tensor("k", k, 3), C.tensor("v", v, 3), C.tensor("k_cache", k_cache, 4), C.tensor("v_cache", v_cache, 4)
    C.same("k", k, v=v, k_cache=k_cache, v_cache=v_cache)
    if k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v shapes {tuple(k.shape)}, {tuple(v.shape)} and cache shapes {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} must match pairwise")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k rows {tuple(k.shape[1:])} do not match cache rows {tuple(k_cache.shape[2:])}")
    C.tensor("slot_mapping", slot_mapping, 1, dtypes=(torch.int64,))
    if slot_mapping.device != k.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but k is on {k.device}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the head dim")
    triton = dispatch.use_triton(k)
    cpu = not triton and dispatch.cpu_store_kvcache(k, v, k_cache, v_cache)
    if not cpu and C.debug_checks():
        C.slot_indices(slot_mapping, k_cache)
    if triton:
        from .triton_paged import store_kvcache_fwd
        store_kvcache_fwd(k, v, k_cache, v_cache, slot_mapping)
        return
    if cpu:
        ext().store_kvcache(k, v, k_cache, v_cache, slot_mapping)
        return
    reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
