"""Plain PyTorch twins of every kernel op: the ground truth the tests hold kernels to.

Computed in fp32 (or the input dtype when it is float64), results cast back to the input
dtype. Slow is fine; clarity and accuracy are the point.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import band


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def visible(sq, sk, left, right, device=None):
    """(sq, sk) bool: query i sees key j within the band [i + sk - sq - left, i + sk - sq + right]
    (bottom-right aligned; -1 leaves that side unbounded)."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def _attend(q, k, v, causal, scale, window_size=(-1, -1)):
    # q (Sq, H, D), k/v (Sk, Hkv, D) for a single sequence -> (Sq, H, D) in accumulation dtype
    left, right = band(window_size, causal)
    sq, h, _ = q.shape
    sk, hkv, _ = k.shape
    rep = h // hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if left >= 0 or right >= 0:
        s = s.masked_fill(~visible(sq, sk, left, right, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key (sq > sk, or a window past the keys) output zeros
    return torch.einsum("hqk,khd->qhd", p, v)


def flash_attention(q, k, v, causal=True, softmax_scale=None, window_size=(-1, -1)):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, D) -> (B, Sq, H, D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.stack([_attend(_acc(q[b]), _acc(k[b]), _acc(v[b]), causal, scale, window_size)
                       for b in range(q.shape[0])])
    return out.to(q.dtype)


def gather_paged(cache, block_table_row, length, scale=None):
    """cache (num_blocks, block_size, Hkv, D), one block_table row -> (length, Hkv, D); a quantised cache
    with its scale (num_blocks, block_size, Hkv) -> the dequantised fp32 rows (dequantize_kv)."""
    bs = cache.shape[1]
    idx = block_table_row[:(length + bs - 1) // bs].long()
    rows = cache[idx].flatten(0, 1)[:length]
    return rows if scale is None else dequantize_kv(rows, scale[idx].flatten(0, 1)[:length])


# ---- KV cache formats (kv_cache_dtype): a cast, or a quantised cache (int8 or float8_e4m3fn) with one fp32
# scale per (token, KV head) row, symmetric: scale = max |row| / QMAX (1 for an all-zero row), stored value
# row / scale, rounded half to even (to an integer for int8, to e4m3's nearest value for fp8)

KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the quantised cache dtypes and their largest value


def quantize_kv(x, dtype=torch.int8):
    """x (..., D) float -> (q (..., D) in dtype (int8 or float8_e4m3fn), within +-KV_QMAX[dtype];
    scale (...) fp32)."""
    qmax = KV_QMAX[dtype]
    w = x.float()
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    r = w / scale[..., None]
    if dtype == torch.int8:
        r = torch.round(r)
    return r.clamp_(-qmax, qmax).to(dtype), scale


def dequantize_kv(q, scale):
    """q (..., D) int8 or float8_e4m3fn, scale (...) fp32 -> the fp32 rows float(q) * scale."""
    return q.float() * scale[..., None]


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=True, softmax_scale=None, block_table=None, window_size=(-1, -1), k_scale=None,
                           v_scale=None):
    """Packed q (total_q, H, D); k/v packed (total_k, Hkv, D), or paged caches with block_table (quantised
    ones with their scales)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros(q.shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]]
        if block_table is None:
            kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        else:
            n = ck[b + 1] - ck[b]
            kb, vb = gather_paged(k, block_table[b], n, k_scale), gather_paged(v, block_table[b], n, v_scale)
        qa = _acc(qb)  # a bfloat16 or quantised cache is read in q's precision
        out[cq[b]:cq[b + 1]] = _attend(qa, kb.to(qa.dtype), vb.to(qa.dtype), causal, scale, window_size)
    return out.to(q.dtype)


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None, window_size=(-1, -1),
                    k_scale=None, v_scale=None):
    """Decode: q (B, H, D), caches (num_blocks, block_size, Hkv, D) (quantised ones with their scales), seq_lens
    (B,) -> (B, H, D). The query is the last cached token, so a window keeps its last left + 1 keys."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        kb, vb = gather_paged(k_cache, block_table[b], n, k_scale), gather_paged(v_cache, block_table[b], n, v_scale)
        qa = _acc(q[b:b + 1])
        outs.append(_attend(qa, kb.to(qa.dtype), vb.to(qa.dtype), False, scale, window_size)[0])
    return torch.stack(outs).to(q.dtype)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k/v (N, Hkv, D) into the paged caches at slot_mapping (N,), in place, cast to the cache's dtype (int8 or
    float8_e4m3fn: quantize_kv, the scales into k_scale/v_scale (num_blocks, block_size, Hkv)); slot -1 skips
    a token."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for src, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = src[keep]
        if scale is not None:
            rows, s = quantize_kv(rows, cache.dtype)
            scale.view(-1, scale.shape[-1])[slots] = s
        cache.view(-1, *cache.shape[2:])[slots] = rows.to(cache.dtype)  # index_put: torch has no fp8 index_copy_


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    h = _acc(x) if residual is None else _acc(x) + _acc(residual)
    # weight and bias in another float dtype (fp32 masters of a float64 x, or the reverse) computed in h's
    y = F.layer_norm(h, h.shape[-1:], weight.to(h.dtype), None if bias is None else bias.to(h.dtype), eps)
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), h.to(x.dtype))


def rms_norm(x, weight, eps=1e-6, residual=None):
    h = _acc(x) if residual is None else _acc(x) + _acc(residual)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * _acc(weight)
    return y.to(x.dtype) if residual is None else (y.to(x.dtype), h.to(x.dtype))


ACTIVATIONS = {
    None: lambda x: x,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def linear(x, weight, bias=None, activation=None):
    y = F.linear(_acc(x), _acc(weight), None if bias is None else _acc(bias))
    return ACTIVATIONS[activation](y).to(x.dtype)


def glu(f, activation="silu"):
    """f (..., 2 ff) = [gate | up] -> act(gate) * up; activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    gate, up = _acc(f).chunk(2, dim=-1)
    act = F.silu if activation == "silu" else ACTIVATIONS[activation]
    return (act(gate) * up).to(f.dtype)


def rope_(t, cos, sin, heads):
    """In place, returns t: t (..., heads', D), its first `heads` heads' first R dims rotated
    (rotate_half within them) by cos, sin (..., R/2); dims [R, D) and the other heads kept."""
    r = cos.shape[-1]
    c, s = (_acc(v).reshape(*t.shape[:-2], 1, r) for v in (cos, sin))
    rot = _acc(t[..., :heads, :])
    x1, x2 = rot[..., :r], rot[..., r:2 * r]
    rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rot[..., 2 * r:]], dim=-1)
    t[..., :heads, :] = rot.to(t.dtype)
    return t


# ---- Weight formats. int8 weight-only: symmetric, one fp32 scale per output row and group of
# group_size consecutive inputs (group_size K: per output channel). A weight's real value is
# float(q) * scale, rounded to fp32; the GEMM then runs in fp32 on x as given. bf16/fp16 storage:
# the weight's value is its low-precision value, widened exactly to fp32.

def quantize_int8(weight, group_size=None):
    """weight (N, K) -> (q (N, K) int8 in [-127, 127], scale (N, K // group_size) fp32) with
    scale = max |w| / 127 over each row's group (1 for an all-zero group) and q = round(w / scale)."""
    n, k = weight.shape
    g = k if group_size is None else group_size
    w = weight.detach().float().reshape(n, k // g, g)
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), scale


def dequantize_int8(q, scale):
    """q (N, K) int8, scale (N, G) fp32 with K % G == 0 -> the fp32 weight float(q) * scale."""
    n, k = q.shape
    return (q.float().reshape(n, scale.shape[1], -1) * scale.float()[..., None]).reshape(n, k)


def linear_int8(x, q, scale, bias=None, activation=None):
    """linear(x, dequantize_int8(q, scale), bias, activation), accumulated in fp32."""
    w = dequantize_int8(q, scale)
    return linear(x, w.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else w.dtype), bias,
                  activation)


# w8a8 (CPU): int8 weights as above against int8 activations, as llama.cpp's q8_0 dot products. Each row
# of x is quantised per block of 32 inputs; each block's dot product with the weight's q is an exact
# integer; the rest is fp32.

def quantize_act32(x):
    """x (M, K) fp32, K % 32 == 0 -> (qx (M, K) int8, sx (M, K // 32) fp32): per row and block of 32
    inputs sx = max |x| / 127 and qx = round-half-even(x * (1 / sx)) (qx 0 where sx is 0)."""
    m, k = x.shape
    b = x.float().reshape(m, k // 32, 32)
    sx = b.abs().amax(-1) / 127.0
    inv = torch.where(sx > 0, 1.0 / sx, torch.zeros_like(sx))
    qx = torch.round(b * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return qx.reshape(m, k), sx


def linear_w8a8(x, q, scale, bias=None, activation=None):
    """x (..., K) fp32, q (N, K) int8, scale (N, K // G) -> act(y + bias), y[m, n] = sum over groups g of
    scale[n, g] * (sum over the group's blocks b of sx[m, b] * dot(qx[m, b], q[n, b])), in fp64 here."""
    n, k = q.shape
    qx, sx = quantize_act32(x.reshape(-1, k).float())
    dots = torch.einsum("mbk,nbk->mnb", qx.double().reshape(-1, k // 32, 32), q.double().reshape(n, k // 32, 32))
    a = dots * sx.double()[:, None, :]  # (M, N, blocks)
    ng = scale.shape[1]
    y = (a.reshape(a.shape[0], n, ng, k // 32 // ng).sum(-1) * scale.double()).sum(-1)  # M may be 0
    if bias is not None:
        y = y + bias.double()
    return ACTIVATIONS[activation](y).to(x.dtype).reshape(*x.shape[:-1], n)


def apply_token_bitmask_(logits, rows, bitmask):
    """kernels.bitmask.apply_token_bitmask_: logits[rows[r]]'s tokens whose bit is 0 in bitmask[r] (int32
    words, token t at bit t % 32 of word t // 32), and those past the words, -> -inf, in place."""
    V = logits.shape[1]
    bits = (bitmask[:, :, None] >> torch.arange(32, device=bitmask.device, dtype=bitmask.dtype)) & 1
    n = min(V, bits.shape[1] * 32)
    sub = logits[rows]
    sub[:, :n].masked_fill_(bits.flatten(1)[:, :n] == 0, float("-inf"))
    sub[:, n:] = float("-inf")
    logits[rows] = sub
    return logits


def lora_add_(y, x, a, b, slots, activation=None):
    """kernels.lora.lora_add_: y += x[i] @ a[s]^T @ b[s] for tokens with slot s = slots[i] >= 0, then
    the activation over y, in place -> y."""
    s = slots.clamp_min(0)
    upd = torch.einsum("mw,mwn->mn", torch.einsum("mk,mwk->mw", _acc(x), _acc(a[s])), _acc(b[s]))
    y.copy_(ACTIVATIONS[activation](_acc(y) + upd * (slots >= 0)[:, None].to(upd.dtype)))
    return y


def decode_layer(x, residual, weights, k_cache, v_cache, slot_mapping, block_table, seq_lens, rope,
                 n_head, eps, rms, activation, softmax_scale, window_size=(-1, -1), parallel=0, part=0, k_scale=None,
                 v_scale=None, lora=None, lora_slots=None):
    """kernels.decode.decode_layer composed from the ops above (the caches are written in place);
    weights: its 12 or 14 tensors, unpacked."""
    n1w, n1b, qw, qb, pw, pb, n2w, n2b, fw, fb, f2w, f2b, *qk = weights
    qn, kn = qk or (None, None)
    norm = (lambda x, w, b, r: rms_norm(x, w, eps, r)) if rms else (lambda x, w, b, r: layer_norm(x, w, b, eps, r))

    def lin(h, w, b, g, act=None):  # GEMM g (qkv, proj, fc, fc2), each token's LoRA update before act
        if lora is None or lora[2 * g] is None:
            return linear(h, w, b, act)
        return lora_add_(linear(h, w, b), h, lora[2 * g], lora[2 * g + 1], lora_slots, act)

    def mlp(h):
        f = (glu(lin(h, fw, fb, 2), "silu" if activation == "swiglu" else "gelu_tanh")
             if activation in ("swiglu", "geglu") else lin(h, fw, fb, 2, activation))
        return lin(f, f2w, f2b, 3)
    if part == 2:
        if parallel == 0:
            h, stream = norm(x, n2w, n2b, residual)
            return mlp(h), stream
        return mlp(norm(residual, n2w, n2b, None) if parallel == 1 else norm(residual, n1w, n1b, None)), residual
    h, stream = norm(x, n1w, n1b, residual) if residual is not None else (norm(x, n1w, n1b, None), x)
    hkv, d = k_cache.shape[2:]
    q, k, v = lin(h, qw, qb, 0).unflatten(-1, (n_head + 2 * hkv, d)).split([n_head, hkv, hkv], dim=1)
    q = q if qn is None else rms_norm(q, qn, eps)
    k = k if kn is None else rms_norm(k, kn, eps)
    if rope is not None:
        q, k = rope_(torch.cat([q, k], dim=1), *rope, n_head + hkv).split([n_head, hkv], dim=1)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    o = paged_attention(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, window_size, k_scale,
                        v_scale).flatten(1)
    a = lin(o, pw, pb, 1)
    if part == 1:
        return a, stream
    if parallel == 0:
        h, stream = norm(a, n2w, n2b, stream)
        return mlp(h), stream
    return a + mlp(norm(stream, n2w, n2b, None) if parallel == 1 else h), stream
