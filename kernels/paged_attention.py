"""Decode attention over a paged KV cache: one query token per sequence."""
from __future__ import annotations

import torch

from . import _checks as C
from .attention import _check_heads, _scale, sdpa


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None):
    """q (B, H, D); k_cache/v_cache (num_blocks, block_size, Hkv, D); block_table
    (B, max_blocks) int32; seq_lens (B,) int32 counts each sequence's valid cached tokens,
    the current one included. Returns (B, H, D).
    """
    C.tensor("q", q, 3), C.tensor("k_cache", k_cache, 4), C.tensor("v_cache", v_cache, 4)
    _check_heads(q, k_cache, v_cache)
    C.int_tensor("block_table", block_table, 2, q.device)
    C.int_tensor("seq_lens", seq_lens, 1, q.device)
    if block_table.shape[0] != q.shape[0] or seq_lens.shape[0] != q.shape[0]:
        raise ValueError(f"block_table rows ({block_table.shape[0]}) and seq_lens ({seq_lens.shape[0]}) "
                         f"must equal the batch size ({q.shape[0]})")
    scale = _scale(softmax_scale, q.shape[-1])
    if C.use_triton(q) and q.dtype != torch.float64:
        from .triton_paged import paged_attention_fwd
        return paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, scale)
    from .reference import gather_paged
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        kb, vb = gather_paged(k_cache, block_table[b], n), gather_paged(v_cache, block_table[b], n)
        out[b] = sdpa(q[None, b:b + 1], kb[None], vb[None], False, scale)[0, 0]
    return out
