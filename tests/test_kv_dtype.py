"""KV caches stored in bfloat16, int8 or fp8 (kv_cache_dtype): the C++ cache write, paged decode, paged
prefill (varlen) and fused decode layer against kernels.reference on the dequantised values; fp8 (no C++
kernel reads it) on CPU through the torch path. The Triton paths: tests/test_kv_dtype_triton.py."""
from __future__ import annotations

import math

import pytest
import torch

from gpt_engine.kernels import (decode_layer, flash_attention_varlen, pack_layer, paged_attention, reference as R,
                                store_kvcache)

from gpt_engine import EngineConfig, SamplingParams
from gpt_engine.llm import LLM

from .helpers import layer_weights, make_hf_model, scattered_table

pytestmark = pytest.mark.usefixtures("torch_cpu_path")  # the C++ kernels, not Triton's interpreter

FORMATS = ["bfloat16", "int8"]


def _cache(fmt, nblk, bs, hkv, d, g):
    """Random K/V written into a cache of format fmt through the reference write -> (k, v, k_scale, v_scale)."""
    dtype = torch.float8_e4m3fn if fmt == "fp8" else getattr(torch, fmt)
    k, v = (torch.zeros(nblk, bs, hkv, d, dtype=dtype) for _ in range(2))
    ks, vs = (torch.zeros(nblk, bs, hkv) if fmt in ("int8", "fp8") else None for _ in range(2))
    src = [torch.randn(nblk * bs, hkv, d, generator=g) * 3 for _ in range(2)]
    R.store_kvcache(*src, k, v, torch.arange(nblk * bs), ks, vs)
    return k, v, ks, vs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_store_matches_reference(fmt, q_dtype):
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(9, 2, 24, generator=g).to(q_dtype) for _ in range(2))
    k[3] = 0  # an all-zero row: scale 1
    slots = torch.tensor([5, -1, 0, 31, 7, 8, 2, 30, 16])
    got = _cache(fmt, 4, 8, 2, 24, g)
    ref = tuple(t if t is None else t.clone() for t in got)
    store_kvcache(k, v, got[0], got[1], slots, got[2], got[3])
    R.store_kvcache(k, v, ref[0], ref[1], slots, ref[2], ref[3])
    if fmt == "int8":
        torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[3], ref[3], rtol=1e-6, atol=0)
        assert (got[0].int() - ref[0].int()).abs().max() <= 1 and (got[1].int() - ref[1].int()).abs().max() <= 1
        deq = R.dequantize_kv(got[0], got[2]).view(-1, 2, 24)[slots[slots >= 0]]
        err = (deq - k[slots >= 0].float()).abs()
        assert (err <= got[2].view(-1, 2)[slots[slots >= 0], :, None] * 0.5 * (1 + 1e-5)).all()
        assert (got[2].view(-1, 2)[31] == 1.0).all() and (got[0].view(-1, 2, 24)[31] == 0).all()  # the zero row
    else:
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# (lens, block_size, H, Hkv, D, window): GQA 1, 2, 4 and H; head dims off the powers of two
DECODE = [
    ([1, 16, 17, 100], 16, 8, 2, 64, (-1, -1)),
    ([33, 5, 64], 32, 4, 4, 24, (-1, -1)),
    ([100, 1], 16, 4, 1, 40, (-1, -1)),
    ([40, 70, 3], 16, 6, 3, 72, (20, 0)),
    ([18, 9], 8, 2, 2, 112, (-1, -1)),
    ([7, 30], 16, 2, 1, 8, (-1, -1)),  # shorter than the 16 values bfloat16 rows are widened by at once
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c[2]}-{c[3]}-{c[4]}")
def test_decode_reads_the_stored_format(fmt, case):
    lens, bs, h, hkv, d, window = case
    g = torch.Generator().manual_seed(d + h)
    nblk = sum(-(-n // bs) for n in lens) + 3
    k, v, ks, vs = _cache(fmt, nblk, bs, hkv, d, g)
    table, seq_lens = scattered_table(lens, bs, nblk, g)
    q = torch.randn(len(lens), h, d, generator=g)
    got = paged_attention(q, k, v, table, seq_lens, window_size=window, k_scale=ks, v_scale=vs)
    # the fp32 reference on the dequantised values
    kf, vf = (c.float() if s is None else R.dequantize_kv(c, s) for c, s in ((k, ks), (v, vs)))
    ref = R.paged_attention(q, kf, vf, table, seq_lens, window_size=window)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(R.paged_attention(q, k, v, table, seq_lens, None, window, ks, vs), ref)
    # the torch path (float64 q) dequantises what it gathers
    got64 = paged_attention(q.double(), k, v, table, seq_lens, window_size=window, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got64, ref.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["float32", *FORMATS])
@pytest.mark.parametrize("threads,hkv,lens", [(4, 3, [70]), (2, 3, [33]), (8, 4, [20, 45]), (3, 1, [9])])
def test_decode_splits_few_sequences_over_threads(fmt, threads, hkv, lens):
    """Fewer sequences than threads: each sequence's KV heads are shared out (unevenly where they do not
    divide), and every head's output is still its own."""
    g = torch.Generator().manual_seed(threads * 10 + hkv)
    bs, h, d = 16, 2 * hkv, 64
    nblk = sum(-(-n // bs) for n in lens) + 2
    k, v, ks, vs = _cache(fmt, nblk, bs, hkv, d, g)
    table, seq_lens = scattered_table(lens, bs, nblk, g)
    q = torch.randn(len(lens), h, d, generator=g)
    kf, vf = (c.float() if s is None else R.dequantize_kv(c, s) for c, s in ((k, ks), (v, vs)))
    ref = R.paged_attention(q, kf, vf, table, seq_lens)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_attention(q, k, v, table, seq_lens, k_scale=ks, v_scale=vs)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", [([5, 40, 17], [1, 16, 17], 16, 4, 2, 40), ([33, 8], [33, 3], 8, 3, 3, 24)])
def test_paged_prefill_reads_the_stored_format(fmt, case):
    lens, new, bs, h, hkv, d = case  # cached lengths and the new (query) tokens at their ends
    g = torch.Generator().manual_seed(d)
    nblk = sum(-(-n // bs) for n in lens) + 2
    k, v, ks, vs = _cache(fmt, nblk, bs, hkv, d, g)
    table, _ = scattered_table(lens, bs, nblk, g)
    q = torch.randn(sum(new), h, d, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (q, k, v, cu_q, cu_k, max(new), max(lens))
    got = flash_attention_varlen(*args, causal=True, block_table=table, k_scale=ks, v_scale=vs)
    kf, vf = (c.float() if s is None else R.dequantize_kv(c, s) for c, s in ((k, ks), (v, vs)))
    ref = R.flash_attention_varlen(q, kf, vf, cu_q, cu_k, max(new), max(lens), causal=True, block_table=table)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_quantize_kv_fp8_round_trip():
    """e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself after the round trip, and within half
    the smallest subnormal's step (2^-10 scale) near zero; the largest magnitude of a row is stored as 448."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, 40, generator=g) * torch.logspace(-3, 3, 64)[:, None, None]
    x[5] = 0
    q, s = R.quantize_kv(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and (s[5] == 1).all() and (q[5].float() == 0).all()
    assert (q.float().abs().amax(-1)[x.abs().amax(-1) > 0] == 448).all()
    err = (R.dequantize_kv(q, s) - x).abs()
    assert (err <= 2 ** -4 * x.abs() + 2 ** -10 * s[..., None] * (1 + 1e-6)).all()


def test_fp8_takes_the_torch_path():
    """No C++ kernel reads fp8: on CPU the cache write, decode and paged prefill go through torch, against the
    reference twins; the fused decode layer (C++ only) refuses it by dtype."""
    g = torch.Generator().manual_seed(4)
    lens, bs, h, hkv, d = [5, 33, 17], 8, 4, 2, 40
    nblk = sum(-(-n // bs) for n in lens) + 1
    k, v, ks, vs = _cache("fp8", nblk, bs, hkv, d, g)
    table, seq_lens = scattered_table(lens, bs, nblk, g)
    new = torch.randn(2, 3, hkv, d, generator=g)
    slots = torch.tensor([3, -1, 40])
    ref = tuple(t.clone() for t in (k, v, ks, vs))
    store_kvcache(new[0], new[1], k, v, slots, ks, vs)
    R.store_kvcache(new[0], new[1], ref[0], ref[1], slots, ref[2], ref[3])
    assert all(torch.equal(a.float(), b.float()) for a, b in zip((k, v, ks, vs), ref))
    kf, vf = R.dequantize_kv(k, ks), R.dequantize_kv(v, vs)
    q = torch.randn(len(lens), h, d, generator=g)
    got = paged_attention(q, k, v, table, seq_lens, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, R.paged_attention(q, kf, vf, table, seq_lens), atol=2e-5, rtol=2e-5)
    new_q = [1, 8, 17]
    qp = torch.randn(sum(new_q), h, d, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(new_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (cu_q, cu_k, max(new_q), max(lens))
    got = flash_attention_varlen(qp, k, v, *args, block_table=table, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, R.flash_attention_varlen(qp, kf, vf, *args, block_table=table), atol=2e-5,
                               rtol=2e-5)
    weights = layer_weights(64, 4, hkv, d, 96, True, False, g)
    with torch.no_grad(), pytest.raises(TypeError, match="k_cache has dtype"):
        decode_layer(torch.randn(len(lens), 64), None, pack_layer(weights), k, v, slots, table, seq_lens, None,
                     4, 1e-5, False, "gelu", 1 / math.sqrt(d), k_scale=ks, v_scale=vs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", [(64, 2, 2, 32, 96, True, "gelu", False), (96, 4, 2, 24, 64, False, "swiglu", True)])
def test_decode_layer_matches_reference(fmt, case):
    C, H, Hkv, D, ff, bias, act, rope = case
    g = torch.Generator().manual_seed(C + D)
    lens, bs = [1, 16, 17, 40, 5], 16
    weights = layer_weights(C, H, Hkv, D, ff, bias, act == "swiglu", g)
    nblk = sum(-(-n // bs) for n in lens) + 3
    cache = _cache(fmt, nblk, bs, Hkv, D, g)
    table, seq_lens = scattered_table(lens, bs, nblk, g)
    slots = torch.tensor([int(table[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)])
    slots[-1] = -1  # a padded row stores nothing
    x = torch.randn(len(lens), C, generator=g)
    cs = None
    if rope:
        ang = (seq_lens.long() - 1)[:, None].double() * 1e4 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        cs = (ang.cos().float(), ang.sin().float())
    args = (table, seq_lens, cs, H, 1e-5, act == "swiglu", act, 1 / math.sqrt(D))
    ref_cache = tuple(t if t is None else t.clone() for t in cache)
    k, v, ks, vs = cache
    with torch.no_grad():
        y, r = decode_layer(x, None, pack_layer(weights), k, v, slots, *args, k_scale=ks, v_scale=vs)
        rk, rv, rks, rvs = ref_cache
        y_ref, r_ref = R.decode_layer(x, None, weights, rk, rv, slots, *args, k_scale=rks, v_scale=rvs)
    if fmt == "int8":  # the rows written agree to one quantisation step
        assert (k.int() - rk.int()).abs().max() <= 1 and (v.int() - rv.int()).abs().max() <= 1
        torch.testing.assert_close(ks, rks, rtol=1e-5, atol=0)
        torch.testing.assert_close(y, y_ref, atol=2e-3, rtol=2e-3)
    else:
        torch.testing.assert_close(k.float(), rk.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(r, r_ref)


def test_bad_caches_are_refused():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 8)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    k8, v8, ks, vs = _cache("int8", 2, 4, 2, 8, g)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_attention(q, k8, v8, table, lens)
    with pytest.raises(ValueError, match="only an int8 KV cache takes k_scale"):
        paged_attention(q, k8.float(), v8.float(), table, lens, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="k_scale has dtype torch.float64"):
        paged_attention(q, k8, v8, table, lens, k_scale=ks.double(), v_scale=vs)
    with pytest.raises(ValueError, match="v_scale must be contiguous"):
        paged_attention(q, k8, v8, table, lens, k_scale=ks, v_scale=vs[:, :2])
    with pytest.raises(TypeError, match="k_scale must be a torch.Tensor"):
        store_kvcache(q[:, :2], q[:, :2], k8, v8, torch.zeros(1, dtype=torch.long), k_scale=1.0, v_scale=vs)
    with pytest.raises(TypeError, match="k_cache has dtype torch.float16"):  # fp16 only under fp16 compute
        paged_attention(q, k8.half(), v8.half(), table, lens)
    with pytest.raises(TypeError, match="v_cache has dtype"):
        paged_attention(q, k8, v8.float(), table, lens, k_scale=ks, v_scale=vs)
    f8, vf8 = (c.view(torch.float8_e4m3fn) for c in (k8, v8))
    with pytest.raises(ValueError, match=r"fp8 \(torch.float8_e4m3fn\) KV cache needs k_scale and v_scale"):
        paged_attention(q, f8, vf8, table, lens, k_scale=ks)
    with pytest.raises(ValueError, match="fp8 .* needs k_scale"):
        store_kvcache(q[:, :2], q[:, :2], f8, vf8, torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="v_cache has dtype"):  # one format for both caches
        paged_attention(q, f8, v8, table, lens, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="v_scale must be contiguous"):  # int8's rules on the scales
        paged_attention(q, f8, vf8, table, lens, k_scale=ks, v_scale=vs[:, :2])


# ---- the engine with a bfloat16 / int8 cache against the fp32 one

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for kind in ("gpt2", "llama"):
        out[kind] = tmp_path_factory.mktemp(kind)
        make_hf_model(kind, out[kind])
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_engine_close_to_fp32_cache(tiny_models, kind):
    """Greedy tokens and their logprobs with a bfloat16 / int8 cache against the fp32 cache's."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 20, 37, 64)]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    res = {}
    for dt in ("auto", "bfloat16", "int8"):
        # a small step budget: the long prompts' later chunks read the cache (paged prefill)
        llm = LLM(str(tiny_models[kind]), device="cpu", kv_cache_dtype=dt, max_num_batched_tokens=16)
        assert llm.runner.kv.dtype == {"auto": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[dt]
        assert (llm.runner.kv_scale is not None) == (dt == "int8")
        res[dt] = llm.generate(prompts, sp, use_tqdm=False)
    for dt, bound in (("bfloat16", 0.01), ("int8", 0.03)):
        for a, b in zip(res["auto"], res[dt]):
            # the tokens agree up to n (a near tie may flip later); each agreed token's logprob is close
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
            assert n >= 16, (dt, a.token_ids, b.token_ids)
            err = max(abs(a.logprobs[i][a.token_ids[i]] - b.logprobs[i][a.token_ids[i]]) for i in range(n))
            assert err <= bound, (dt, err)


def test_pool_counts_bytes(tiny_models):
    """The CPU default pool is a byte budget: a smaller cache dtype holds more blocks."""
    blocks, runners = {}, {}
    for dt in ("auto", "bfloat16", "int8"):
        llm = LLM(str(tiny_models["llama"]), device="cpu", kv_cache_dtype=dt, max_num_seqs=1024)
        runners[dt], blocks[dt] = llm.runner, llm.runner.num_blocks
    r = runners["int8"]
    d = r.model.config.head_dim
    assert r.block_bytes(torch.float32) == 4 * r.block_bytes(torch.int8) * d // (d + 4)
    assert r.block_bytes(torch.float8_e4m3fn) == r.block_bytes(torch.int8)  # the GPU's pool: the scales counted
    assert blocks["bfloat16"] == 2 * blocks["auto"]
    assert blocks["int8"] == blocks["auto"] * 4 * d // (d + 4)
    # an explicit size stays a count of blocks or tokens whatever the dtype
    llm = LLM(str(tiny_models["llama"]), device="cpu", kv_cache_dtype="int8", kv_cache_tokens=100)
    assert llm.runner.num_blocks == 7


@pytest.mark.parametrize("bad,match", [("float16", "kv_cache_dtype must be one of"),
                                       ("int4", "kv_cache_dtype must be one of")])
def test_bad_kv_cache_dtype(tiny_models, bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(kv_cache_dtype=bad)
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_models["gpt2"]), device="cpu", kv_cache_dtype=bad)


def test_fp8_needs_a_gpu(tiny_models):
    assert EngineConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs a GPU"):
        LLM(str(tiny_models["gpt2"]), device="cpu", kv_cache_dtype="fp8")


@pytest.mark.gpu
def test_gpu_engine_close_to_fp32_cache(tiny_models):
    """test_engine_close_to_fp32_cache on CUDA (the Triton paths, CUDA graphs) for llama (GQA, rotary): fp32
    compute, so only the cache format differs; fp8 (e4m3: 3 mantissa bits) drifts more than int8. Then bf16
    compute with each quantised cache runs through graphs and frees its blocks. Few sequences: few graphs."""
    path = str(tiny_models["llama"])
    fp8 = ("fp8",) if torch.cuda.get_device_capability() >= (8, 9) else ()  # e4m3 conversions: Ada, Hopper
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 20, 37, 64)]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    res = {}
    for dt in ("auto", "bfloat16", "int8", *fp8):
        llm = LLM(path, device="cuda", dtype=torch.float32, kv_cache_dtype=dt, max_num_batched_tokens=16,
                  max_num_seqs=4)
        assert llm.runner.graphs, "CUDA graph capture failed (see the log warning)"
        assert (llm.runner.kv_scale is not None) == (dt in ("int8", "fp8"))
        res[dt] = llm.generate(prompts, sp, use_tqdm=False)
    bounds = {"bfloat16": 0.01, "int8": 0.03, "fp8": 0.05}
    for dt in [d for d in res if d != "auto"]:
        bound = bounds[dt]
        for a, b in zip(res["auto"], res[dt]):
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
            assert n >= 16, (dt, a.token_ids, b.token_ids)
            err = max(abs(a.logprobs[i][a.token_ids[i]] - b.logprobs[i][a.token_ids[i]]) for i in range(n))
            assert err <= bound, (dt, err)
    for dt in ("int8", *fp8):
        llm = LLM(path, device="cuda", dtype=torch.bfloat16, kv_cache_dtype=dt, max_num_batched_tokens=16,
                  max_num_seqs=4)
        assert llm.runner.graphs
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert all(len(o.token_ids) == 32 for o in outs)
        s = llm.stats()
        assert s["num_free_blocks"] == s["num_total_blocks"]
