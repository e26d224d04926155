"""FlashAttention-2 in Triton: forward and backward, dense (B, S, H, D) and varlen/paged.

One kernel per pass serves every layout: dense batches use batch strides, varlen batches
read per-sequence offsets from cu_seqlens (VARLEN), paged K/V go through a block table
(PAGED). Softmax runs in the log2 domain in fp32; the forward stores the row LSE (log2,
+inf for rows that see no key, so the backward's exp2(s - lse) is 0 there).
GQA reads K/V head h // (H // Hkv); the dk/dv kernel loops over the group's query heads,
so K/V are never repeated and no atomics are needed (deterministic).

A paged cache may hold another format than q's (kv_cache_dtype): bfloat16, or int8 / fp8 (e4m3) with
an fp32 scale per (slot, KV head) row (SCALED). The forward widens its tiles to q's dtype in
registers and applies K's row scales to the scores' columns and V's to the softmax weights'
(kernels/triton_paged.py does the same): no dequantised copy of the cache.

Masking is a band, bottom-right aligned: row i sees keys i + lo_off <= j <= i + up, with
up = Sk - Sq + right (CAUSAL: the right edge exists; causal is right = 0) and lo_off = Sk - Sq - left
(LOCAL: the left edge exists). Each pass visits only the tiles that meet the band, and masks
only the tiles that cross an edge of it, so a sliding window costs O(S x W).

This file holds the kernels and their launchers (attention_fwd, attention_bwd); the autograd
ops over them are in kernels/attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# Under the interpreter (CPU tests) fixed small blocks keep the numpy emulation quick and
# still exercise multi-block loops, BLOCK_M != BLOCK_N and masked tails.
_CPU_FWD = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
_CPU_DQ = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
_CPU_DKDV = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)


def _cfgs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


# Hopper (sm_90): 128-row tiles with 8 warps feed wgmma; smaller ones win for short sequences.
_FWD_CONFIGS = _cfgs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
                      (64, 64, 4, 3), (64, 32, 4, 2)])
_DQ_CONFIGS = _cfgs([(128, 32, 4, 4), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)])
# dk/dv holds two (BLOCK_N, D) fp32 accumulators: 8 warps keep big key tiles spill-free at D=64
# and D=128 on sm_90 (benchmarks/triton_regs.py), where 4 warps spill from 128 keys up
_DKDV_CONFIGS = _cfgs([(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (16, 128, 8, 3), (64, 64, 8, 3),
                       (32, 64, 4, 3), (16, 64, 8, 3)])
# Joined to the configs above that _smem_prune keeps wherever it drops some (big D, fp32): small
# tiles, the second without pipelining, that fit D=256 in fp32 in 100 KB of shared memory, so that
# autotuning always has a config that compiles
_FWD_SMALL = _cfgs([(32, 32, 4, 2), (32, 16, 4, 1)])
_DQ_SMALL = _cfgs([(32, 32, 4, 2), (16, 32, 4, 1)])
_DKDV_SMALL = _cfgs([(16, 32, 4, 2), (16, 16, 4, 1)])
_TUNE_KEY = ["tune_q", "tune_k", "BLOCK_D", "CAUSAL", "LOCAL", "VARLEN", "PAGED"]


def block_d(d: int) -> int:
    """The tiles' head-dim width: a power of two (masked past d), at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(d))


def _smem_prune(resident, streamed, small):
    """An early_config_prune dropping the configs whose tiles cannot fit the GPU's shared memory
    (autotuning would only fail to compile them, and at D=256 it fails most), by a rough upper bound:
    `resident` tiles held per program plus `streamed` tiles per pipeline stage, each BLOCK_M or
    BLOCK_N ("M", "N") rows of BLOCK_D. Where it drops any, the `small` configs join the rest: the
    bound is rough, and with two or more candidates a config that fails to compile is skipped."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        limit = triton.runtime.driver.active.utils.get_device_properties(q.device.index)["max_shared_mem"]
        width = kwargs["BLOCK_D"] * q.element_size()

        def nbytes(c):
            per_stage = sum(c.kwargs["BLOCK_" + r] for r in streamed) * max(c.num_stages, 1)
            return (sum(c.kwargs["BLOCK_" + r] for r in resident) + per_stage) * width
        kept = [c for c in configs if nbytes(c) <= limit]
        return configs if len(kept) == len(configs) else kept + small
    return dict(early_config_prune=prune)


@triton.jit
def _kv_rows(bt_ptr, offs_n, stride_b, stride_t, nmask, PAGED: tl.constexpr, PAGE: tl.constexpr):
    # (BLOCK_N,) offsets of key rows offs_n; paged rows go through the block table
    if PAGED:
        blk = tl.load(bt_ptr + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
        return blk * stride_b + (offs_n % PAGE) * stride_t
    else:
        return offs_n.to(tl.int64) * stride_t


@triton.jit
def _kv_ptrs(base, bt_ptr, offs_n, offs_d, stride_b, stride_t, nmask, PAGED: tl.constexpr, PAGE: tl.constexpr):
    # (BLOCK_N, BLOCK_D) pointers to key rows offs_n
    return base + _kv_rows(bt_ptr, offs_n, stride_b, stride_t, nmask, PAGED, PAGE)[:, None] + offs_d[None, :]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, stride_kb, stride_kt, stride_vb,
               stride_vt, stride_sb, stride_st, offs_m, offs_d, lo, hi, sk, up, lo_off, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, LOCAL: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
               PREC: tl.constexpr, SCALED: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < sk
        kp = _kv_ptrs(k_base, bt_ptr, offs_n, offs_d, stride_kb, stride_kt, nmask, PAGED, PAGE)
        vp = _kv_ptrs(v_base, bt_ptr, offs_n, offs_d, stride_vb, stride_vt, nmask, PAGED, PAGE)
        if MASKED or HEAD_D != BLOCK_D:
            msk = nmask[:, None] & (offs_d[None, :] < HEAD_D)
            k = tl.load(kp, mask=msk, other=0.0)
            v = tl.load(vp, mask=msk, other=0.0)
        else:  # interior tiles: no predicates in the hot loop
            k = tl.load(kp)
            v = tl.load(vp)
        k = k.to(q.dtype)  # a paged cache in another format, widened in registers
        v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if SCALED:  # (BLOCK_N,) row scales (SCALED implies PAGED): K's on the scores, V's on the weights
            srow = _kv_rows(bt_ptr, offs_n, stride_sb, stride_st, nmask, PAGED, PAGE)
            qk = qk * tl.load(ks_base + srow, mask=nmask, other=0.0)[None, :]
            vs = tl.load(vs_base + srow, mask=nmask, other=0.0)
        if MASKED:
            ok = nmask[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + up)
            if LOCAL:
                ok = ok & (offs_n[None, :] >= offs_m[:, None] + lo_off)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: keep p = 0, not nan
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SCALED:
            p = p * vs[None, :]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN: tl.constexpr):
    # (q_start, sq, k_start, sk) of sequence b: packed offsets (varlen) or the dense shape
    # starts are int64: packed offsets times token strides overflow int32 on long batches
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        sq = tl.load(CU_Q + b + 1) - q_start
        sk = tl.load(CU_K + b + 1) - k_start
        return q_start, sq, k_start, sk
    else:
        return 0, seq_q, 0, seq_k


@triton.jit
def _q_block(CU_Q, CU_K, H, GROUP, seq_q, seq_k, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    # this program's query block of a (cdiv(max_seqlen_q, BLOCK_M), B * H) grid -> (b, h, kv head,
    # q_start, sq, k_start, sk, first row m0); causal runs the longest (last) q blocks first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, sq, k_start, sk = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN)
    return b, h, h // GROUP, q_start, sq, k_start, sk, pid_m * BLOCK_M


@triton.jit
def _key_range(m0, sk, up, lo_off, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # the key tiles query rows [m0, m0 + BLOCK_M) meet -> (lo, a_end, full, hi): [lo, a_end) cross the
    # band's left edge (masked), [a_end, full) lie inside it (no mask), [max(full, a_end), hi) cross
    # its right edge or the end of the keys (masked). Every bound is a BLOCK_N multiple or an end,
    # so the three ranges tile [lo, hi) without overlap.
    if CAUSAL:
        hi = tl.minimum(sk, m0 + BLOCK_M + up)
        full = tl.maximum(tl.minimum(m0 + up + 1, sk), 0) // BLOCK_N * BLOCK_N
    else:
        hi = sk
        full = sk // BLOCK_N * BLOCK_N
    if LOCAL:
        lo = tl.maximum(m0 + lo_off, 0) // BLOCK_N * BLOCK_N
        a_end = tl.maximum(tl.minimum(tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + lo_off, 0), BLOCK_N) * BLOCK_N, hi), lo)
    else:
        lo = 0
        a_end = 0
    return lo, a_end, full, hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, BT, KS, VS,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                stride_lb, stride_lh, stride_btb, stride_sb, stride_st,
                H, GROUP, seq_q, seq_k, qk_scale, win_l, win_r, tune_q, tune_k,
                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                PAGED: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr, LOCAL: tl.constexpr,
                SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (cdiv(max_seqlen_q, BLOCK_M), B * H); SCALED: KS/VS (blocks, PAGE, Hkv) fp32, a quantised
    # paged cache's row scales
    b, h, kvh, q_start, sq, k_start, sk, m0 = _q_block(CU_Q, CU_K, H, GROUP, seq_q, seq_k, CAUSAL, VARLEN, BLOCK_M)
    if m0 >= sq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + q_start * stride_qt + h * stride_qh
    qmask = (offs_m[:, None] < sq) & (offs_d[None, :] < HEAD_D)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qmask, other=0.0)
    if PAGED:
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
    else:
        k_base = K + b64 * stride_kb + k_start * stride_kt + kvh * stride_kh
        v_base = V + b64 * stride_vb + k_start * stride_vt + kvh * stride_vh
    bt_ptr = BT + b64 * stride_btb
    ks_base = KS + kvh  # the scales' head stride is 1 (contiguous)
    vs_base = VS + kvh

    up = sk - sq + win_r
    lo_off = sk - sq - win_l
    lo, a_end, full, hi = _key_range(m0, sk, up, lo_off, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if LOCAL:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, stride_kb,
                                   stride_kt, stride_vb, stride_vt, stride_sb, stride_st, offs_m, offs_d, lo, a_end,
                                   sk, up, lo_off, qk_scale, BLOCK_N, HEAD_D, BLOCK_D, True, CAUSAL, LOCAL, PAGED,
                                   PAGE, PREC, SCALED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, stride_kb, stride_kt,
                               stride_vb, stride_vt, stride_sb, stride_st, offs_m, offs_d, a_end, full, sk, up,
                               lo_off, qk_scale, BLOCK_N, HEAD_D, BLOCK_D, False, CAUSAL, LOCAL, PAGED, PAGE, PREC,
                               SCALED)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, bt_ptr, stride_kb, stride_kt,
                               stride_vb, stride_vt, stride_sb, stride_st, offs_m, offs_d, tl.maximum(full, a_end),
                               hi, sk, up, lo_off, qk_scale, BLOCK_N, HEAD_D, BLOCK_D, True, CAUSAL, LOCAL, PAGED,
                               PAGE, PREC, SCALED)
    empty = l_i == 0.0  # rows that see no key (causal with Sq > Sk, or a window past the keys) output 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = O + b64 * stride_ob + q_start * stride_ot + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    l_base = LSE + b64 * stride_lb + h * stride_lh + q_start
    tl.store(l_base + offs_m, lse, mask=offs_m < sq)


@triton.jit
def _bwd_pre_kernel(O, DO, DELTA, CU_Q,
                    stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, stride_lb, stride_lh,
                    H, seq_q, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    # delta = rowsum(dO * O), same layout as LSE
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_start, sq, _, _ = _seq_bounds(CU_Q, CU_Q, b, seq_q, seq_q, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < sq) & (offs_d[None, :] < HEAD_D)
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)[:, None]
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b64 * stride_db + h * stride_dh + rows * stride_dt + offs_d[None, :], mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < sq)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, sk, up, lo_off,
              qk_scale, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)[:, None]
        if MASKED or HEAD_D != BLOCK_D:
            msk = (offs_n[:, None] < sk) & (offs_d[None, :] < HEAD_D)
            k = tl.load(k_base + rows * stride_kt + offs_d[None, :], mask=msk, other=0.0)
            v = tl.load(v_base + rows * stride_vt + offs_d[None, :], mask=msk, other=0.0)
        else:
            k = tl.load(k_base + rows * stride_kt + offs_d[None, :])
            v = tl.load(v_base + rows * stride_vt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            ok = offs_n[None, :] < sk
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + up)
            if LOCAL:
                ok = ok & (offs_n[None, :] >= offs_m[:, None] + lo_off)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
               stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
               stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
               stride_gb, stride_gt, stride_gh, stride_lb, stride_lh,
               H, GROUP, seq_q, seq_k, qk_scale, scale, win_l, win_r, tune_q, tune_k,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
               PAGED: tl.constexpr, PREC: tl.constexpr, LOCAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # grid (cdiv(max_seqlen_q, BLOCK_M), B * H): dq = scale * dS K over the forward's key range
    b, h, kvh, q_start, sq, k_start, sk, m0 = _q_block(CU_Q, CU_K, H, GROUP, seq_q, seq_k, CAUSAL, VARLEN, BLOCK_M)
    if m0 >= sq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)[:, None]
    msk = (offs_m[:, None] < sq) & (offs_d[None, :] < HEAD_D)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b64 * stride_db + h * stride_dh + rows * stride_dt + offs_d[None, :], mask=msk, other=0.0)
    l_base = b64 * stride_lb + h * stride_lh + q_start
    lse = tl.load(LSE + l_base + offs_m, mask=offs_m < sq, other=float("inf"))
    delta = tl.load(DELTA + l_base + offs_m, mask=offs_m < sq, other=0.0)
    k_base = K + b64 * stride_kb + k_start * stride_kt + kvh * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vt + kvh * stride_vh
    up = sk - sq + win_r
    lo_off = sk - sq - win_l
    lo, a_end, full, hi = _key_range(m0, sk, up, lo_off, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if LOCAL:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, a_end, sk, up,
                       lo_off, qk_scale, BLOCK_N, HEAD_D, BLOCK_D, True, CAUSAL, LOCAL, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, a_end, full, sk, up,
                   lo_off, qk_scale, BLOCK_N, HEAD_D, BLOCK_D, False, CAUSAL, LOCAL, PREC)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   tl.maximum(full, a_end), hi, sk, up, lo_off, qk_scale, BLOCK_N, HEAD_D, BLOCK_D, True, CAUSAL,
                   LOCAL, PREC)
    dq = dq * scale
    tl.store(DQ + b64 * stride_gb + h * stride_gh + rows * stride_gt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=msk)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qh, stride_dh, stride_lh,
                stride_qt, stride_dt, GROUP, offs_n, offs_d, lo, hi, sq, up, lo_off, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                LOCAL: tl.constexpr, PREC: tl.constexpr):
    # one flat loop over (group head g, row tile): the row loop nested in a per-head loop kept
    # far more registers live on sm_90 (255 and spilling in 7 of the 8 old D=64/128 configs)
    n = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for it in range(0, GROUP * n):
        g = it // n
        offs_m = lo + (it - g * n) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        mmask = offs_m < sq
        l_off = g.to(tl.int64) * stride_lh
        # q^T (BLOCK_D, BLOCK_M) so that k @ q^T is (BLOCK_N, BLOCK_M): rows of p^T belong to our keys
        qT = tl.load(q_base + g * stride_qh + rows[None, :] * stride_qt + offs_d[:, None],
                     mask=mmask[None, :] & (offs_d[:, None] < HEAD_D), other=0.0)
        lse = tl.load(lse_base + l_off + offs_m, mask=mmask, other=float("inf"))
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - lse[None, :])
        if MASKED:  # the band: key j visible to row i when i + lo_off <= j <= i + up
            if CAUSAL:
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + up, pT, 0.0)
            if LOCAL:
                pT = tl.where(offs_n[:, None] >= offs_m[None, :] + lo_off, pT, 0.0)
        do = tl.load(do_base + g * stride_dh + rows[:, None] * stride_dt + offs_d[None, :],
                     mask=mmask[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(delta_base + l_off + offs_m, mask=mmask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_db, stride_dt, stride_dh,
                 stride_gkb, stride_gkt, stride_gkh, stride_gvb, stride_gvt, stride_gvh, stride_lb, stride_lh,
                 HKV, GROUP, seq_q, seq_k, qk_scale, scale, win_l, win_r, tune_q, tune_k,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                 PAGED: tl.constexpr, PREC: tl.constexpr, LOCAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # grid (cdiv(max_seqlen_k, BLOCK_N), B * Hkv): one K/V tile, summed over the group's GROUP q heads
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    q_start, sq, k_start, sk = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = b.to(tl.int64)
    krows = (k_start + offs_n).to(tl.int64)[:, None]
    msk = (offs_n[:, None] < sk) & (offs_d[None, :] < HEAD_D)
    k = tl.load(K + b64 * stride_kb + kvh * stride_kh + krows * stride_kt + offs_d[None, :], mask=msk, other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + krows * stride_vt + offs_d[None, :], mask=msk, other=0.0)
    up = sk - sq + win_r
    lo_off = sk - sq - win_l
    # the query rows that meet this key tile: [r_lo, u_end) cross the band's right edge, [u_end,
    # l_start) see the whole tile, [l_start, r_hi) cross its left edge; every bound a BLOCK_M
    # multiple or an end, so the ranges do not overlap
    if CAUSAL:  # row i sees key j when i >= j - up
        r_lo = tl.maximum(n0 - up, 0) // BLOCK_M * BLOCK_M
        u_end = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - up, 0), BLOCK_M) * BLOCK_M
    else:
        r_lo = 0
        u_end = 0
    if LOCAL:  # row i sees key j when i <= j - lo_off
        r_hi = tl.minimum(sq, tl.maximum(n0 + BLOCK_N - lo_off, 0))
        l_start = tl.maximum(n0 - lo_off + 1, 0) // BLOCK_M * BLOCK_M
    else:
        r_hi = sq
        l_start = sq
    u_end = tl.maximum(tl.minimum(u_end, r_hi), r_lo)
    l_start = tl.maximum(tl.minimum(l_start, r_hi), u_end)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    h = kvh * GROUP  # the group's first query head
    q_base = Q + b64 * stride_qb + q_start * stride_qt + h * stride_qh
    do_base = DO + b64 * stride_db + q_start * stride_dt + h * stride_dh
    l_off = b64 * stride_lb + h * stride_lh + q_start
    if CAUSAL:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + l_off, DELTA + l_off, stride_qh, stride_dh,
                             stride_lh, stride_qt, stride_dt, GROUP, offs_n, offs_d, r_lo, u_end, sq, up, lo_off,
                             qk_scale, BLOCK_M, HEAD_D, True, CAUSAL, LOCAL, PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + l_off, DELTA + l_off, stride_qh, stride_dh, stride_lh,
                         stride_qt, stride_dt, GROUP, offs_n, offs_d, u_end, l_start, sq, up, lo_off, qk_scale,
                         BLOCK_M, HEAD_D, False, CAUSAL, LOCAL, PREC)
    if LOCAL:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + l_off, DELTA + l_off, stride_qh, stride_dh,
                             stride_lh, stride_qt, stride_dt, GROUP, offs_n, offs_d, l_start, r_hi, sq, up, lo_off,
                             qk_scale, BLOCK_M, HEAD_D, True, CAUSAL, LOCAL, PREC)
    dk = dk * scale
    tl.store(DK + b64 * stride_gkb + kvh * stride_gkh + krows * stride_gkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=msk)
    tl.store(DV + b64 * stride_gvb + kvh * stride_gvh + krows * stride_gvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=msk)


# resident: q (fwd), q and dO (dq), k and v (dk/dv); streamed: the other pair, per stage
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY,
                             prune_configs_by=_smem_prune("M", "NN", _FWD_SMALL))(_fwd_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY,
                            prune_configs_by=_smem_prune("MM", "NN", _DQ_SMALL))(_dq_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY,
                              prune_configs_by=_smem_prune("NN", "MM", _DKDV_SMALL))(_dkdv_kernel)

LOG2E = 1.4426950408889634


def _launch(tuned, raw, cpu_cfg, grid_of, args, consts, x):
    """Autotuned launch on CUDA; fixed small blocks under the interpreter."""
    if x.is_cuda:
        tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
    else:
        raw[grid_of(cpu_cfg["BLOCK_M"], cpu_cfg["BLOCK_N"])](*args, **consts, **cpu_cfg)


def _tune_bucket(n):
    return min(triton.next_power_of_2(max(n, 16)), 8192)  # retune per power of 2, not per length


def _s(x, varlen):
    # (batch, token, head) strides; packed tensors have no batch stride
    return (0, x.stride(0), x.stride(1)) if varlen else (x.stride(0), x.stride(1), x.stride(2))


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _Meta:
    """Shape facts shared by the forward and backward launches of one call."""

    def __init__(self, q, k, cu_q, max_sq, max_sk, causal, scale, paged, window):
        self.varlen = cu_q is not None
        self.batch = cu_q.shape[0] - 1 if self.varlen else q.shape[0]
        self.h, self.d = q.shape[-2], q.shape[-1]
        self.hkv = k.shape[-2]
        self.max_sq, self.max_sk = max_sq, max_sk
        # window (left, right) with causal folded in (right 0); CAUSAL: the band has a right edge
        left, right = window
        if causal:
            right = 0
        self.window = (max(left, 0), max(right, 0))
        self.consts = dict(HEAD_D=self.d, BLOCK_D=block_d(self.d), CAUSAL=right >= 0,
                           LOCAL=left >= 0, VARLEN=self.varlen, PAGED=paged,
                           PREC="ieee" if q.dtype == torch.float32 else "tf32")
        self.tune = (_tune_bucket(max_sq), _tune_bucket(max_sk))
        self.scale = scale
        self.qk_scale = scale * LOG2E

    def lse_empty(self, q):
        shape = (self.h, q.shape[0]) if self.varlen else (self.batch, self.h, self.max_sq)
        return torch.empty(shape, device=q.device, dtype=torch.float32)

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def attention_fwd(q, k, v, cu_q, cu_k, block_table, max_sq, max_sk, causal, scale, window=(-1, -1), k_scale=None,
                  v_scale=None):
    """Launcher: -> out like q, lse (fp32, log2). cu_q None: dense (B, S, H, D). window (left, right),
    -1 unbounded, bottom-right aligned like causal. With block_table, k/v are paged caches in q's dtype,
    bfloat16, or int8 / fp8 with k_scale/v_scale (blocks, block_size, Hkv) fp32 contiguous."""
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    paged = block_table is not None
    m = _Meta(q, k, cu_q, max_sq, max_sk, causal, scale, paged, window)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = m.lse_empty(q)
    if paged:
        ks, vs = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
        bt, bt_stride, page = block_table, block_table.stride(0), k.shape[1]
    else:
        ks, vs = _s(k, m.varlen), _s(v, m.varlen)
        bt, bt_stride, page = q, 0, 1  # unused
    scaled = k_scale is not None
    k_s, v_s = (k_scale, v_scale) if scaled else (q, q)  # unused without scales
    dummy = cu_q if m.varlen else q
    args = (q, k, v, out, lse, dummy, cu_k if m.varlen else q, bt, k_s, v_s,
            *_s(q, m.varlen), *ks, *vs, *_s(out, m.varlen), *m.lse_strides(lse), bt_stride, page * m.hkv, m.hkv,
            m.h, m.h // m.hkv, max_sq, max_sk, m.qk_scale, *m.window, *m.tune)
    _launch(_fwd_tuned, _fwd_kernel, _CPU_FWD, lambda bm, bn: (triton.cdiv(max_sq, bm), m.batch * m.h),
            args, dict(m.consts, PAGE=page, SCALED=scaled), q)
    return out, lse


def attention_bwd(do, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, causal, scale, window=(-1, -1)):
    """Launcher: -> dq, dk, dv."""
    do, q, k, v = _last_contig(do), _last_contig(q), _last_contig(k), _last_contig(v)
    m = _Meta(q, k, cu_q, max_sq, max_sk, causal, scale, False, window)
    vl = m.varlen
    cu_q_, cu_k_ = (cu_q, cu_k) if vl else (q, q)
    delta = torch.empty_like(lse)
    blk = 64 if q.is_cuda else 32
    _bwd_pre_kernel[(triton.cdiv(max_sq, blk), m.batch * m.h)](
        out, do, delta, cu_q_, *_s(out, vl), *_s(do, vl), *m.lse_strides(lse), m.h, max_sq,
        HEAD_D=m.consts["HEAD_D"], BLOCK_D=m.consts["BLOCK_D"], VARLEN=vl, BLOCK_M=blk)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    common = (*_s(q, vl), *_s(k, vl), *_s(v, vl), *_s(do, vl))
    tail = (m.h // m.hkv, max_sq, max_sk, m.qk_scale, scale, *m.window, *m.tune)
    _launch(_dq_tuned, _dq_kernel, _CPU_DQ, lambda bm, bn: (triton.cdiv(max_sq, bm), m.batch * m.h),
            (q, k, v, do, dq, lse, delta, cu_q_, cu_k_, *common, *_s(dq, vl), *m.lse_strides(lse), m.h, *tail),
            m.consts, q)
    _launch(_dkdv_tuned, _dkdv_kernel, _CPU_DKDV, lambda bm, bn: (triton.cdiv(max_sk, bn), m.batch * m.hkv),
            (q, k, v, do, dk, dv, lse, delta, cu_q_, cu_k_, *common, *_s(dk, vl), *_s(dv, vl),
             *m.lse_strides(lse), m.hkv, *tail), m.consts, q)
    return dq, dk, dv
