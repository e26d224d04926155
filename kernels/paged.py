"""Decode attention over a paged KV cache (one query token per sequence) and the cache write.

kernel (kernels/triton_paged.py, csrc/paged_cpu.cpp) -> launchers -> custom ops -> public
functions; inference only, so no autograd. kernels._dispatch picks the path: Triton on CUDA (and
on CPU under TRITON_INTERPRET=1); CPU fp32/fp16/bf16 the C++ kernels; float64 or a build without
gpt_engine.kernels._C plain torch. Eager calls run the launchers directly; under torch.compile the
public functions call the custom ops instead, which torch.compile keeps whole (and which check
their arguments at run time, where the traced public function could not).
The argument rules are csrc/checks.cpp's (kernels/_checks.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _dispatch as dispatch
from . import reference
from ._ext import ext
from .attention import _scale

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


def _paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left, right):
    """Check (the C++ kernel's entry point checks for itself), route, run."""
    triton = dispatch.use_triton(q)
    if not triton and dispatch.cpu_paged_attention(q, k_cache, v_cache):
        q = q if dispatch.rows_dense(q) else q.contiguous()
        return ext().paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left, right)
    C.check("paged_attention", q, k_cache, v_cache, block_table, seq_lens, left, right)
    if C.debug_checks():
        C.paged_indices(block_table, seq_lens, k_cache)
    if triton:
        from .triton_paged import paged_attention_fwd
        return paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, scale, left)
    return _paged_sdpa(q, k_cache, v_cache, block_table, seq_lens, scale, left)


def _store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    triton = dispatch.use_triton(k)
    if not triton and dispatch.cpu_store_kvcache(k, v, k_cache, v_cache):
        ext().store_kvcache(k, v, k_cache, v_cache, slot_mapping)
        return
    C.check("store_kvcache", k, v, k_cache, v_cache, slot_mapping)
    if C.debug_checks():
        C.slot_indices(slot_mapping, k_cache)
    if triton:
        from .triton_paged import store_kvcache_fwd
        store_kvcache_fwd(k, v, k_cache, v_cache, slot_mapping)
        return
    reference.store_kvcache(k, v, k_cache, v_cache, slot_mapping)


# ---- custom ops: what torch.compile sees of the launchers


@torch.library.custom_op("gpt_engine::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, left: int, right: int) -> torch.Tensor:
    return _paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale, left, right)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, left, right):
    return q.new_empty(q.shape)


@torch.library.custom_op("gpt_engine::store_kvcache", mutates_args=("k_cache", "v_cache"))
def _store_kvcache_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    _store_kvcache(k, v, k_cache, v_cache, slot_mapping)


@_store_kvcache_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


# ---- public functions

def paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None, window_size=(-1, -1)):
    """q (B, H, D); k_cache/v_cache (num_blocks, block_size, Hkv, D); block_table
    (B, max_blocks) int32; seq_lens (B,) int32 counts each sequence's valid cached tokens,
    the current one included. window_size (left, right) as in flash_attention: the query is the
    last cached token, so it sees the last left + 1 keys (right has no key to act on), and only
    their blocks are read. Returns (B, H, D).
    """
    C.tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)
    left, right = C.window(window_size)
    args = (q, k_cache, v_cache, block_table, seq_lens, _scale(softmax_scale, q), left, right)
    if torch.compiler.is_compiling():
        return _paged_attention_op(*args)
    return _paged_attention(*args)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping):
    """Write new tokens' keys/values into the paged caches, in place.

    k/v (N, Hkv, D); caches (num_blocks, block_size, Hkv, D); slot_mapping (N,) int64 flat slot
    (block * block_size + offset), -1 to skip a token.
    """
    C.tensors(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if torch.compiler.is_compiling():
        _store_kvcache_op(k, v, k_cache, v_cache, slot_mapping)
    else:
        _store_kvcache(k, v, k_cache, v_cache, slot_mapping)
