"""Decode attention over a paged KV cache (split-K flash-decoding) and the K/V cache write.

Decode is bandwidth bound: each program streams one kv head's K/V for a slice of the
context once and serves all H // Hkv query heads of that group from it (one tl.dot with
the group padded to 16 rows). A second kernel merges the per-split (max, sumexp, acc).
Every launch decision depends on shapes only (never on seq_lens values), so the decode
step can be captured in a CUDA graph. A sliding window (the last left + 1 keys) splits only the
window's span: blocks before it are never read.

The cache may hold another format than q's (kv_cache_dtype): bfloat16, or int8 / fp8 (e4m3) with an
fp32 scale per (slot, KV head) row. Its tiles are widened to q's dtype in registers (exact for int8 and
e4m3 values) and the row scales applied where they cost least: to the scores' columns for K, to the
softmax weights' columns for V (sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j), so no dequantised copy
of the cache is ever made. The cache write quantises each row as kernels.reference.quantize_kv does.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import KV_QMAX
from .triton_attention import block_d as block_d_of

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(Q, K, V, KS, VS, BT, SEQ, O, ML, ACC,
                   stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_sb, stride_st, stride_btb, stride_ob, stride_oh, qk_scale, split_len, win_l,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr,
                   LOCAL: tl.constexpr, SCALED: tl.constexpr):
    # grid (B, Hkv, NUM_SPLITS); ML (B, H, NUM_SPLITS, 2) fp32, ACC (B, H, NUM_SPLITS, BLOCK_D) fp32;
    # SCALED: KS/VS (blocks, PAGE, Hkv) fp32, the quantised cache's row scales
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(SEQ + b)
    if LOCAL:  # the query is token n - 1: it sees keys [n - 1 - win_l, n)
        lo = tl.maximum(n - 1 - win_l, 0) + split * split_len
    else:
        lo = split * split_len
    hi = tl.minimum(lo + split_len, n)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_D
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    bt = BT + b64 * stride_btb
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        blk = tl.load(bt + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
        slot = (offs_n % PAGE)[:, None]
        msk = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + blk[:, None] * stride_kb + slot * stride_kt + offs_d[None, :], mask=msk, other=0.0)
        v = tl.load(v_base + blk[:, None] * stride_vb + slot * stride_vt + offs_d[None, :], mask=msk, other=0.0)
        k = k.to(q.dtype)  # another cache format, widened in registers
        v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if SCALED:  # (BLOCK_N,) row scales: K's on the scores, V's on the weights
            srow = blk * stride_sb + (offs_n % PAGE) * stride_st + kvh
            qk = qk * tl.load(KS + srow, mask=nmask, other=0.0)[None, :]
            vs = tl.load(VS + srow, mask=nmask, other=0.0)
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: offs_n[0] < hi is always valid
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SCALED:
            p = p * vs[None, :]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])
    else:
        part = (b64 * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split  # (G_PAD,) row of (B*H*S)
        tl.store(ML + part * 2, m_i, mask=gmask)
        tl.store(ML + part * 2 + 1, l_i, mask=gmask)
        tl.store(ACC + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _combine_kernel(ML, ACC, O, stride_ob, stride_oh, H,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr):
    # grid (B, H): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; empty splits have l_s = 0
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < NUM_SPLITS
    row = (b.to(tl.int64) * H + h) * NUM_SPLITS + offs_s
    m = tl.load(ML + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(ML + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    acc = tl.load(ACC + row[:, None] * BLOCK_D + offs_d[None, :], mask=smask[:, None], other=0.0)
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_D)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch, hkv, max_ctx, device) -> int:
    """Enough programs for ~2 waves over the SMs, but at least 256 tokens per split."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_ctx, 32)))  # interpreter: exercise the combine path
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, batch * hkv)
    return max(1, min(want, triton.cdiv(max_ctx, 256), 64))


def paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, scale, left=-1, k_scale=None, v_scale=None):
    """q (B, H, D); caches (num_blocks, block_size, Hkv, D) in q's dtype, bfloat16, or int8 / fp8 with
    k_scale/v_scale (num_blocks, block_size, Hkv) fp32 contiguous; block_table (B, max_blocks) int32;
    seq_lens (B,) int32; left >= 0: each query sees its last left + 1 keys. Returns (B, H, D).
    Arguments already validated."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    batch, h, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    block_d = block_d_of(d)
    max_ctx = block_table.shape[1] * page  # shape-based: CUDA-graph safe
    if left >= 0:
        max_ctx = min(max_ctx, left + 1)  # the most keys a window holds
    splits = _num_splits(batch, hkv, max_ctx, q.device)
    cuda = q.is_cuda
    # fewer keys a tile as D grows: each stage's K and V tiles stay in shared memory
    block_n = (128 if block_d < 128 else 64 if block_d == 128 else 32) if cuda else 16
    split_len = triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if splits > 1:
        ml = torch.empty((batch, h, splits, 2), device=q.device, dtype=torch.float32)
        acc = torch.empty((batch, h, splits, block_d), device=q.device, dtype=torch.float32)
    else:
        ml = acc = out  # unused
    scaled = k_scale is not None
    ks, vs = (k_scale, v_scale) if scaled else (q, q)  # unused without scales
    _decode_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, ks, vs, block_table, seq_lens, out, ml, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page * hkv, hkv, block_table.stride(0),
        out.stride(0), out.stride(1), scale * LOG2E, split_len, max(left, 0),
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_D=d, BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE=page, NUM_SPLITS=splits, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        LOCAL=left >= 0, SCALED=scaled, num_warps=4, num_stages=3 if cuda else 1)
    if splits > 1:
        _combine_kernel[(batch, h)](ml, acc, out, out.stride(0), out.stride(1), h, HEAD_D=d, BLOCK_D=block_d,
                                    NUM_SPLITS=splits, S_PAD=triton.next_power_of_2(splits), num_warps=4)
    return out


@triton.jit
def _quantize_rows(x, QMAX: tl.constexpr, INT: tl.constexpr):
    # (BLOCK_H, BLOCK_D) fp32 rows (zero past the head dim) -> (rows / scale, scale (BLOCK_H,)) as
    # kernels.reference.quantize_kv: scale max |row| / QMAX (1 for a zero row); INT: rounded half to even
    amax = tl.max(tl.abs(x), 1)
    scale = tl.where(amax > 0, amax / QMAX, 1.0)
    r = x / scale[:, None]
    if INT:  # 1.5 * 2^23 pushes the fraction out of fp32's mantissa, which rounds it half to even
        r = (r + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -QMAX), QMAX), scale


@triton.jit
def _store_kv_kernel(K, V, KC, VC, KS, VS, SLOT, stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_cb, stride_ct, stride_ch, stride_db, stride_dt, stride_dh,
                     HKV: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     PAGE: tl.constexpr, QMAX: tl.constexpr, INT: tl.constexpr):
    # grid (N,): token i's (Hkv, D) rows into slot SLOT[i] (skipped when -1), cast to the cache's dtype;
    # QMAX > 0: quantised (int8 when INT, else fp8), each row's scale into KS/VS (blocks, PAGE, Hkv)
    i = tl.program_id(0)
    slot = tl.load(SLOT + i)
    if slot < 0:
        return
    blk = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    msk = (offs_h < HKV) & (offs_d < HEAD_D)
    i64 = i.to(tl.int64)
    k = tl.load(K + i64 * stride_kn + offs_h * stride_kh + offs_d, mask=msk, other=0.0)
    v = tl.load(V + i64 * stride_vn + offs_h * stride_vh + offs_d, mask=msk, other=0.0)
    if QMAX > 0:
        k, k_s = _quantize_rows(k.to(tl.float32), QMAX, INT)
        v, v_s = _quantize_rows(v.to(tl.float32), QMAX, INT)
        heads = tl.arange(0, BLOCK_H)
        tl.store(KS + slot * HKV + heads, k_s, mask=heads < HKV)
        tl.store(VS + slot * HKV + heads, v_s, mask=heads < HKV)
    tl.store(KC + blk * stride_cb + off * stride_ct + offs_h * stride_ch + offs_d, k.to(KC.dtype.element_ty),
             mask=msk)
    tl.store(VC + blk * stride_db + off * stride_dt + offs_h * stride_dh + offs_d, v.to(VC.dtype.element_ty),
             mask=msk)


def store_kvcache_fwd(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k/v (N, Hkv, D) -> caches (num_blocks, block_size, Hkv, D) at slot_mapping (N,) int64, in place: cast
    to the cache's dtype, or quantised (int8 / fp8) with each row's scale into k_scale/v_scale
    (num_blocks, block_size, Hkv) fp32 contiguous."""
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    n, hkv, d = k.shape
    if n == 0:
        return
    qmax = KV_QMAX[k_cache.dtype] if k_scale is not None else 0.0
    ks, vs = (k_scale, v_scale) if k_scale is not None else (k, v)  # unused without scales
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, ks, vs, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), HKV=hkv, HEAD_D=d, BLOCK_H=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(d), PAGE=k_cache.shape[1], QMAX=qmax, INT=k_cache.dtype == torch.int8,
        num_warps=4)
