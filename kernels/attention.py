"""Flash attention: dense and varlen (optionally over a paged KV cache).

kernel (kernels/triton_attention.py, csrc/varlen_cpu.cpp) -> launchers -> autograd (torch.library
ops over the Triton kernels) -> public functions. kernels._dispatch picks the path: Triton on CUDA
(and on CPU under TRITON_INTERPRET=1); on plain CPU, float32 varlen inference runs the C++
kernel and the rest torch SDPA. The argument rules are csrc/checks.cpp's (kernels/_checks.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _dispatch as dispatch
from ._ext import ext


# ---- launchers (Triton's are kernels/triton_attention.py's attention_fwd / attention_bwd, imported
# on first use so that CPU paths never load Triton)

def sdpa(q, k, v, causal, scale, window=None):
    """torch SDPA on (B, S, H, D) tensors with GQA, bottom-right causal alignment and a key window
    (left, right) as _checks.band gives it (causal folded into right; None: causal alone)."""
    sq, sk = q.shape[1], k.shape[1]
    left, right = window if window is not None else (-1, 0 if causal else -1)
    square_causal = left < 0 and right == 0 and sq == sk  # the fused causal kernel aligns squares only
    mask = empty = None
    # row 0 sees the fewest keys: when its right edge reaches the last key and there is no left
    # edge, every row sees every key
    if not square_causal and (left >= 0 or 0 <= right < sq - 1):
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        mask = (j <= i + right) if right >= 0 else torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if left >= 0:
            mask = mask & (j >= i - left)
        empty = ~mask.any(-1)
        # rows that see no key attend to every key, then are zeroed: an all-masked row is nan in SDPA
        mask = mask | empty[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=square_causal and sq > 1, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    if empty is not None and bool(empty.any()):
        o = o.masked_fill(empty[None, None, :, None], 0.0)
    return o.transpose(1, 2)


def _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, block_table, window, k_scale=None,
                 v_scale=None):
    """torch SDPA once per sequence (float64, with grad, or where the C++ kernel does not apply); a
    bfloat16, int8 or fp8 paged cache is read as q's dtype."""
    from .reference import gather_paged
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if block_table is None:
            kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        else:
            n = ck[b + 1] - ck[b]
            kb = gather_paged(k, block_table[b], n, k_scale).to(q.dtype)
            vb = gather_paged(v, block_table[b], n, v_scale).to(q.dtype)
        out[cq[b]:cq[b + 1]] = sdpa(q[None, cq[b]:cq[b + 1]], kb[None], vb[None], causal, scale, window)[0]
    return out


def _varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, block_table, window, k_scale, v_scale):
    """csrc/varlen_cpu.cpp; its entry point checks every argument and index, window as given."""
    return ext().varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, block_table, *window, k_scale,
                                  v_scale)


# ---- autograd: torch.library ops, opaque to torch.compile (no graph break), differentiable through
# register_autograd

# check: the public function's checks did not run (torch.compile traced it): run them here, at run time

@torch.library.custom_op("gpt_engine::flash_attn_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, left: int,
               right: int, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if check:
        C.check("flash_attention", q, k, v, left, right)
    from .triton_attention import attention_fwd
    return attention_fwd(q, k, v, None, None, None, q.shape[1], k.shape[1], causal, scale, (left, right))


@_flash_fwd.register_fake
def _(q, k, v, causal, scale, left, right, check):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("gpt_engine::flash_attn_bwd", mutates_args=())
def _flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, causal: bool, scale: float, left: int,
               right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_attention import attention_bwd
    return attention_bwd(do, q, k, v, out, lse, None, None, q.shape[1], k.shape[1], causal, scale, (left, right))


@_flash_bwd.register_fake
def _(do, q, k, v, out, lse, causal, scale, left, right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.scale, ctx.left, ctx.right, _check = inputs
    ctx.save_for_backward(q, k, v, *output)


def _flash_grad(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(do, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.left, ctx.right)
    return dq, dk, dv, None, None, None, None, None


_flash_fwd.register_autograd(_flash_grad, setup_context=_flash_setup)


@torch.library.custom_op("gpt_engine::flash_attn_varlen_fwd", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                max_sq: int, max_sk: int, causal: bool, scale: float, block_table: Optional[torch.Tensor], left: int,
                right: int, check: bool, k_scale: Optional[torch.Tensor],
                v_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if check:
        _check_varlen(q, k, v, cu_q, cu_k, block_table, left, right, k_scale, v_scale)
    from .triton_attention import attention_fwd
    return attention_fwd(q, k, v, cu_q, cu_k, block_table, max_sq, max_sk, causal, scale, (left, right), k_scale,
                         v_scale)


@_varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_sq, max_sk, causal, scale, block_table, left, right, check, k_scale, v_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("gpt_engine::flash_attn_varlen_bwd", mutates_args=())
def _varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_sq: int, max_sk: int, causal: bool,
                scale: float, left: int, right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_attention import attention_bwd
    return attention_bwd(do, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, causal, scale, (left, right))


@_varlen_bwd.register_fake
def _(do, q, k, v, out, lse, cu_q, cu_k, max_sq, max_sk, causal, scale, left, right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, ctx.max_sq, ctx.max_sk, ctx.causal, ctx.scale, block_table, ctx.left, ctx.right, *_ = inputs
    ctx.paged = block_table is not None
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)


def _varlen_grad(ctx, do, _dlse):
    if ctx.paged:
        raise NotImplementedError("flash_attention_varlen with block_table (paged KV) has no backward")
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd(do, q, k, v, out, lse, cu_q, cu_k, ctx.max_sq, ctx.max_sk, ctx.causal, ctx.scale,
                             ctx.left, ctx.right)
    return dq, dk, dv, *[None] * 12


_varlen_fwd.register_autograd(_varlen_grad, setup_context=_varlen_setup)


# ---- public functions

def _scale(softmax_scale, q):
    # a q without a head dim fails its check; until then any scale does
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1] if q.dim() else 1)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, left, right, k_scale=None, v_scale=None):
    """The rules of every path but the C++ kernel's (its entry point runs the same ones itself)."""
    if block_table is not None:
        k, v = C.kv_bytes(k, v)
    checked = C.check("varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, left, right, k_scale, v_scale)
    if checked and C.debug_checks():
        C.varlen_indices(cu_seqlens_q, cu_seqlens_k, q, k, block_table)
    return checked


def flash_attention(q, k, v, causal=True, softmax_scale=None, window_size=(-1, -1)):
    """Scaled dot-product attention, fused.

    q (B, Sq, H, D), k and v (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA). Causal masking is
    aligned bottom-right: query i sees keys j <= i + Sk - Sq. window_size (left, right), -1
    unbounded: query i sees keys i + Sk - Sq - left <= j <= i + Sk - Sq + right (causal fixes
    right at 0; a sliding window of W keys is causal with (W - 1, 0)); key tiles outside the band
    are skipped. Returns (B, Sq, H, D). Differentiable in q, k and v.
    """
    C.tensors(q=q, k=k, v=v)
    left, right = C.window(window_size)
    checked = C.check("flash_attention", q, k, v, left, right)
    scale = _scale(softmax_scale, q)
    window = (left, 0 if causal else right)
    if dispatch.use_triton(q):
        return _flash_fwd(q, k, v, bool(causal), scale, *window, not checked)[0]
    return sdpa(q, k, v, causal, scale, window)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=True, softmax_scale=None, block_table=None, window_size=(-1, -1), k_scale=None,
                           v_scale=None):
    """Attention over packed variable-length sequences.

    q (total_q, H, D); k/v (total_k, Hkv, D) packed like q, or, with block_table
    (B, max_blocks) int32, paged caches (num_blocks, block_size, Hkv, D) where
    cu_seqlens_k[b+1] - cu_seqlens_k[b] is sequence b's cached length (its new tokens
    included); paged caches as paged_attention takes them (q's dtype, bfloat16, or int8 / fp8 with
    k_scale/v_scale). cu_seqlens_* are int32 (B+1). window_size (left, right) as in flash_attention,
    per sequence. Returns (total_q, H, D).
    """
    C.tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if block_table is not None:
        C.tensors(block_table=block_table)
    C.scales(k_scale, v_scale, k if block_table is not None else None)
    left, right = C.window(window_size)
    scale = _scale(softmax_scale, q)
    triton = dispatch.use_triton(q)
    if not triton and dispatch.cpu_varlen_attention(q, k, v, paged=block_table is not None):
        return _varlen_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, block_table, (left, right), k_scale,
                           v_scale)
    checked = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, left, right, k_scale, v_scale)
    window = (left, 0 if causal else right)
    if triton:
        return _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
                           scale, block_table, *window, not checked, k_scale, v_scale)[0]
    return _varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, block_table, window, k_scale, v_scale)
