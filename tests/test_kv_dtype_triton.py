"""The Triton paths over KV caches stored in another format than q's (kv_cache_dtype): bfloat16, and int8 or
fp8 (e4m3) with an fp32 scale per (slot, KV head). The cache write, paged decode and paged prefill (varlen
with a block table) against kernels.reference: under Triton's interpreter on CPU (fp32 and fp16 compute:
its bf16 dot is broken) and on CUDA (`gpu`, bf16 compute too)."""
from __future__ import annotations

import os

import pytest
import torch

from gpt_engine.kernels import flash_attention_varlen, paged_attention, reference as R, store_kvcache

from .helpers import scattered_table

FMTS = {"bfloat16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest without a GPU
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU needs the "
                                                        "interpreter")),
           pytest.param("cuda", marks=pytest.mark.gpu)]
Q_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if INTERPRETED:  # another module's fixture may have turned it off for the engine tests
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _skip(device, q_dtype, attention=True):
    if device == "cpu" and q_dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 dot is broken")
    if device == "cuda" and attention and q_dtype != torch.bfloat16:
        pytest.skip("on CUDA the attention tests run the served compute dtype: each dtype is a compile (and the "
                    "prefill an autotune) of its own")


def _empty(fmt, nblk, bs, hkv, d, device):
    """A zeroed cache pair of format fmt (and its scales) -> (k, v, k_scale, v_scale)."""
    k, v = (torch.zeros(nblk, bs, hkv, d, dtype=FMTS[fmt], device=device) for _ in range(2))
    ks, vs = (torch.zeros(nblk, bs, hkv, device=device) if fmt != "bfloat16" else None for _ in range(2))
    return k, v, ks, vs


def _cache(fmt, nblk, bs, hkv, d, g, device):
    """Random K/V written into a cache of format fmt through the reference write."""
    k, v, ks, vs = _empty(fmt, nblk, bs, hkv, d, "cpu")
    src = [torch.randn(nblk * bs, hkv, d, generator=g) * 3 for _ in range(2)]
    R.store_kvcache(*src, k, v, torch.arange(nblk * bs), ks, vs)
    return tuple(None if t is None else t.to(device) for t in (k, v, ks, vs))


def _dequantized(k, v, ks, vs):
    return tuple(c.float() if s is None else R.dequantize_kv(c, s) for c, s in ((k, ks), (v, vs)))


def _close(got, ref, q_dtype):
    # fp32: the kernels' only rounding is the accumulation order; fp16/bf16: q's and the softmax
    # weights' rounding before the dots (the tiles of a quantised cache widen to q's dtype exactly)
    tol = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[q_dtype]
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


def _representable(fmt, n, hkv, d, g, dtype):
    """Rows the cache format holds exactly after the write's scaling: fp8 values times a power of two per row,
    each row's largest 448 times it (so its scale is that power of two); bfloat16 values. The interpreter's
    float downcasts do not round to nearest even, the GPU's do: on these rows rounding has nothing to do."""
    if fmt == "bfloat16":
        return (torch.randn(n, hkv, d, generator=g) * 3).to(torch.bfloat16).to(dtype)
    x = (torch.randn(n, hkv, d, generator=g) * 100).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    x[..., 0] = 448.0 * torch.where(torch.rand(n, hkv, generator=g) < 0.5, -1.0, 1.0)
    x = x[..., torch.randperm(d, generator=g)]
    return (x * 2.0 ** torch.randint(-4, 3, (n, hkv, 1), generator=g)).to(dtype)


# ---- the cache write

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
@pytest.mark.parametrize("fmt", FMTS)
def test_store_matches_reference(fmt, q_dtype, device):
    """Skipped slots (-1) untouched, an all-zero row scale 1, Hkv 3 and D 40 off the powers of two. int8 rounds
    in the kernel (half to even): random rows, one step of slack for the GPU's division; bfloat16 / fp8 round in
    the float conversion: rows it holds exactly (_representable), the rounding itself on the GPU below."""
    _skip(device, q_dtype, attention=False)
    g = torch.Generator().manual_seed(1)
    n, hkv, d = 9, 3, 40
    if fmt == "int8":
        k, v = ((torch.randn(n, hkv, d, generator=g) * 3).to(q_dtype) for _ in range(2))
    else:
        k, v = (_representable(fmt, n, hkv, d, g, q_dtype) for _ in range(2))
    k[3] = 0
    slots = torch.tensor([5, -1, 0, 31, 7, 8, 2, 30, 16])
    got = _empty(fmt, 4, 8, hkv, d, device)
    ref = _empty(fmt, 4, 8, hkv, d, "cpu")
    store_kvcache(k.to(device), v.to(device), got[0], got[1], slots.to(device), got[2], got[3])
    R.store_kvcache(k, v, *ref[:2], slots, *ref[2:])
    got = tuple(None if t is None else t.cpu() for t in got)
    if fmt == "int8":
        for c, r in zip(got[:2], ref[:2]):  # a tie the GPU's division moved: rare, one step
            assert (c.int() - r.int()).abs().max() <= 1 and (c != r).float().mean() < 1e-2
    else:
        for c, r in zip(got[:2], ref[:2]):
            assert torch.equal(c.float(), r.float())
    if fmt != "bfloat16":
        for s, r in zip(got[2:], ref[2:]):
            torch.testing.assert_close(s, r, rtol=1e-6, atol=0)
        assert (got[2].view(-1, hkv)[31] == 1).all() and (got[0].view(-1, hkv, d)[31].float() == 0).all()
    unwritten = torch.ones(32, dtype=torch.bool)
    unwritten[slots[slots >= 0]] = False
    assert (got[0].view(32, -1)[unwritten].float() == 0).all() and (got[1].view(32, -1)[unwritten].float() == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bfloat16", "fp8"])
def test_gpu_store_rounds_to_nearest(fmt):
    """Random rows rounded as the reference rounds them (to nearest even): bfloat16 exactly; fp8 but for a rare
    tie that the GPU's fp32 division (not correctly rounded) moved by a step."""
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(300, 8, 128, generator=g) * 3 for _ in range(2))
    slots = torch.randperm(64 * 16, generator=g)[:300]
    kc, vc, ks, vs = _empty(fmt, 64, 16, 8, 128, "cuda")
    store_kvcache(k.cuda(), v.cuda(), kc, vc, slots.cuda(), ks, vs)
    rk, rv, rks, rvs = _empty(fmt, 64, 16, 8, 128, "cpu")
    R.store_kvcache(k, v, rk, rv, slots, rks, rvs)
    for c, r in ((kc, rk), (vc, rv)):
        got, want = c.cpu().float(), r.float()
        if fmt == "bfloat16":
            assert torch.equal(got, want)
        else:  # e4m3 has 3 mantissa bits: a step is at most 2^-3 of the value, 2^-9 among the subnormals
            assert ((got - want).abs() <= 2 ** -3 * want.abs() + 2 ** -9).all()
            assert (got != want).float().mean() < 1e-3
    if fmt == "fp8":
        torch.testing.assert_close(ks.cpu(), rks, rtol=1e-6, atol=0)
        torch.testing.assert_close(vs.cpu(), rvs, rtol=1e-6, atol=0)


# ---- paged decode

# (lens, block_size, H, Hkv, D, window): partial blocks, groups of 4, 1 and 3 query heads; head dims 40 and 72;
# a window
DECODE = [
    ([1, 16, 17, 45], 16, 8, 2, 40, (-1, -1)),
    ([33, 5], 8, 4, 4, 72, (-1, -1)),
    ([40, 70, 3], 16, 6, 2, 64, (20, 0)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}-{c[4]}-{c[5][0]}")
def test_decode_reads_the_stored_format(case, fmt, q_dtype, device):
    _skip(device, q_dtype)
    lens, bs, h, hkv, d, window = case
    g = torch.Generator().manual_seed(d + h)
    nblk = sum(-(-n // bs) for n in lens) + 2
    k, v, ks, vs = _cache(fmt, nblk, bs, hkv, d, g, device)
    table, seq_lens = scattered_table(lens, bs, nblk, g, device)
    q = torch.randn(len(lens), h, d, generator=g).to(device, q_dtype)
    got = paged_attention(q, k, v, table, seq_lens, window_size=window, k_scale=ks, v_scale=vs)
    kf, vf = _dequantized(k, v, ks, vs)
    _close(got, R.paged_attention(q.float(), kf, vf, table, seq_lens, window_size=window), q_dtype)


# ---- paged prefill: new tokens at the ends of cached sequences (a prompt's later chunks)

# (cached lengths, new tokens, block_size, H, Hkv, D, window)
PREFILL = [
    ([5, 40, 17], [1, 16, 17], 16, 4, 2, 40, (-1, -1)),
    ([33, 8], [33, 3], 8, 3, 3, 72, (-1, -1)),
    ([50, 21], [20, 21], 8, 4, 1, 64, (12, 0)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_dtype", Q_DTYPES)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"{c[2]}-{c[3]}-{c[4]}-{c[5]}-{c[6][0]}")
def test_paged_prefill_reads_the_stored_format(case, fmt, q_dtype, device):
    _skip(device, q_dtype)
    if device == "cuda" and case is not PREFILL[-1]:
        pytest.skip("one shape on CUDA: each is an autotune")
    lens, new, bs, h, hkv, d, window = case
    g = torch.Generator().manual_seed(d)
    nblk = sum(-(-n // bs) for n in lens) + 2
    k, v, ks, vs = _cache(fmt, nblk, bs, hkv, d, g, device)
    table, _ = scattered_table(lens, bs, nblk, g, device)
    q = torch.randn(sum(new), h, d, generator=g).to(device, q_dtype)
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    got = flash_attention_varlen(q, k, v, cu_q, cu_k, max(new), max(lens), causal=True, block_table=table,
                                 window_size=window, k_scale=ks, v_scale=vs)
    kf, vf = _dequantized(k, v, ks, vs)
    ref = R.flash_attention_varlen(q.float(), kf, vf, cu_q, cu_k, max(new), max(lens), causal=True,
                                   block_table=table, window_size=window)
    _close(got, ref, q_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_write_then_decode(fmt, device):
    """The engine's decode step on the Triton paths (the write, then attention over the cache holding it)
    equals the same step on the reference twins."""
    g = torch.Generator().manual_seed(3)
    lens, bs, hkv, d = [5, 20, 33], 8, 2, 40
    nblk = sum(-(-n // bs) for n in lens) + 1
    cache = _cache(fmt, nblk, bs, hkv, d, g, device)
    ref = tuple(None if t is None else t.cpu().clone() for t in cache)
    table, seq_lens = scattered_table(lens, bs, nblk, g, device)
    slots = torch.tensor([int(table[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)])
    # fp8: rows it holds exactly (the interpreter's downcast is not the GPU's); int8 rounds them in the kernel
    k, v = (_representable(fmt, len(lens), hkv, d, g, torch.float32) for _ in range(2))
    q = torch.randn(len(lens), 4, d, generator=g)
    store_kvcache(k.to(device), v.to(device), cache[0], cache[1], slots.to(device), cache[2], cache[3])
    got = paged_attention(q.to(device), cache[0], cache[1], table, seq_lens, k_scale=cache[2], v_scale=cache[3])
    R.store_kvcache(k, v, ref[0], ref[1], slots, ref[2], ref[3])
    want = R.paged_attention(q, ref[0], ref[1], table.cpu(), seq_lens.cpu(), k_scale=ref[2], v_scale=ref[3])
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)
