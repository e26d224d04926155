"""Weight-only int8 GEMM (w8a16) for decode-sized batches: y = act(x @ (float(q) * scale)^T + bias).

Decode GEMMs are bound by the weight stream, so the weight travels as int8 (half of bf16's bytes)
and is dequantised in registers: each (BLOCK_K, BLOCK_N) tile of q is widened to fp32, multiplied
by its rows' group scales, cast to x's dtype and fed to tl.dot with an fp32 accumulator. That is
F.linear on the dequantised weight in x's precision, the arithmetic kernels.reference.linear_int8
defines up to the rounding of x's dtype. x's rows are few (one program row-block covers them), so
the grid is over N: every program streams its own slice of the weight once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w8a16_kernel(X, Q, S, B, Y, M, N, K, G, NG, stride_xm, stride_ym,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    # grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); q (N, K) int8 row-major; scale (N, NG) fp32, NG = K // G
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        q = tl.load(Q + rn64[None, :] * K + kk[:, None], mask=wmask, other=0)  # (BLOCK_K, BLOCK_N)
        s = tl.load(S + rn64[None, :] * NG + (kk // G)[:, None], mask=wmask, other=0.0)
        w = q.to(tl.float32) * s
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # GELU (erf)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:  # GELU, tanh form: u * sigmoid(2z)
        z = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * z))
    elif ACT == 3:
        acc = tl.maximum(acc, 0.0)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def w8a16(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias, act: int) -> torch.Tensor:
    """x2 (M, K) contiguous fp32/fp16/bf16, q (N, K) int8 contiguous, scale (N, K // G) fp32 contiguous,
    bias (N,) in x's dtype or None -> (M, N) in x's dtype. Checked by kernels.quant."""
    M, K = x2.shape
    N, ng = q.shape[0], scale.shape[1]
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0 or N == 0:
        return y
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64  # tl.dot's smallest tile is 16 rows
    block_n, block_k = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w8a16_kernel[grid](x2, q, scale, bias if bias is not None else y, y, M, N, K, K // ng, ng,
                        x2.stride(0), y.stride(0), HAS_BIAS=bias is not None, ACT=act, BLOCK_M=block_m,
                        BLOCK_N=block_n, BLOCK_K=block_k, PREC="ieee" if x2.dtype == torch.float32 else "tf32")
    return y
