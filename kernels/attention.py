"""Flash attention: dense and varlen (optionally over a paged KV cache).

Public functions validate their arguments, then dispatch: Triton kernels on CUDA (and on
CPU under TRITON_INTERPRET=1); on plain CPU, float32 varlen inference runs gpt_engine.kernels._C
(csrc/varlen_cpu.cpp) and the rest torch SDPA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks as C
from ._ext import ext

HEAD_DIMS = (32, 64, 80, 96, 128)


def _check_heads(q, k, v, qname="q"):
    C.same(qname, q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    h, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k head dim {k.shape[-1]} != q head dim {d}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hkv})")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} not supported; use one of {HEAD_DIMS}")


def _cpu_varlen_kernel(q, k, v, paged=False) -> bool:
    """csrc/varlen_cpu.cpp: CPU float32 inference (it has no backward), q's rows dense as split from
    a fused projection, K/V likewise or contiguous paged caches; elsewhere torch SDPA per sequence."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] % 16 == 0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and _rows_dense(q)
            and (k.is_contiguous() and v.is_contiguous() if paged else _rows_dense(k) and _rows_dense(v))
            and not torch.compiler.is_compiling() and ext() is not None)


def _rows_dense(x: torch.Tensor) -> bool:
    """(..., heads, D) whose rows may be strided but each row is dense, as split from a fused projection."""
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def _scale(softmax_scale, d):
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def sdpa(q, k, v, causal, scale):
    """torch SDPA on (B, S, H, D) tensors with bottom-right causal alignment and GQA."""
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal and sq > 1 and sq != sk:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        mask = j <= i + sk - sq
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal and sq > 1 and sq == sk,  # square: fused causal kernel
                                       scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    if mask is not None and sq > sk:
        o = o.masked_fill(~mask.any(-1)[None, None, :, None], 0.0)  # rows that see no key
    return o.transpose(1, 2)


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """Scaled dot-product attention, fused.

    q (B, Sq, H, D), k and v (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA). Causal masking is
    aligned bottom-right: query i sees keys j <= i + Sk - Sq. Returns (B, Sq, H, D).
    Differentiable in q, k and v.
    """
    C.tensor("q", q, 4), C.tensor("k", k, 4), C.tensor("v", v, 4)
    _check_heads(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch {k.shape[0]} != q batch {q.shape[0]}")
    scale = _scale(softmax_scale, q.shape[-1])
    if C.use_triton(q) and q.dtype != torch.float64:
        from .triton_attention import flash_attn_func
        return flash_attn_func(q, k, v, causal, scale)
    return sdpa(q, k, v, causal, scale)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=True, softmax_scale=None, block_table=None):
    """Attention over packed variable-length sequences.

    q (total_q, H, D); k/v (total_k, Hkv, D) packed like q, or, with block_table
    (B, max_blocks) int32, paged caches (num_blocks, block_size, Hkv, D) where
    cu_seqlens_k[b+1] - cu_seqlens_k[b] is sequence b's cached length (its new tokens
    included). cu_seqlens_* are int32 (B+1). Returns (total_q, H, D).
    """
    C.tensor("q", q, 3)
    C.tensor("k", k, 3 if block_table is None else 4), C.tensor("v", v, 3 if block_table is None else 4)
    _check_heads(q, k, v)
    C.int_tensor("cu_seqlens_q", cu_seqlens_q, 1, q.device)
    C.int_tensor("cu_seqlens_k", cu_seqlens_k, 1, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both have B+1 entries")
    if block_table is not None:
        C.int_tensor("block_table", block_table, 2, q.device)
        if block_table.shape[0] != cu_seqlens_q.shape[0] - 1:
            raise ValueError(f"block_table has {block_table.shape[0]} rows for {cu_seqlens_q.shape[0] - 1} sequences")
    scale = _scale(softmax_scale, q.shape[-1])
    if C.use_triton(q) and q.dtype != torch.float64:
        from .triton_attention import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                      causal, scale, block_table)
    if _cpu_varlen_kernel(q, k, v, paged=block_table is not None):
        return ext().varlen_attention(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), causal, scale,
                                      block_table)
    from .reference import gather_paged
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if block_table is None:
            kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        else:
            n = ck[b + 1] - ck[b]
            kb, vb = gather_paged(k, block_table[b], n), gather_paged(v, block_table[b], n)
        out[cq[b]:cq[b + 1]] = sdpa(q[None, cq[b]:cq[b + 1]], kb[None], vb[None], causal, scale)[0]
    return out
