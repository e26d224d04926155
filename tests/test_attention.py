"""flash_attention / flash_attention_varlen (Triton, under the interpreter on CPU) vs kernels.reference.

fp32: tight tolerances. fp16/bf16: kernel error vs the fp32 reference <= 2x the error of the
same math done by plain torch in that dtype, plus a small atol.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from gpt_engine import kernels
from gpt_engine.kernels import reference as R

CPU = torch.device("cpu")


def _rand(*shape, dtype=torch.float32, device=CPU, grad=True):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def _lowp_attention(q, k, v, causal, window=(-1, -1)):
    """The same op in plain torch at the inputs' own precision (the yardstick for fp16/bf16)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.stack([R._attend(q[b], k[b], v[b], causal, scale, window) for b in range(q.shape[0])])


def _fwd_bwd(fn, inputs, do):
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, do)]


def assert_within(got, ref32, lowp, atol, what=""):
    """|got - ref32| <= 2 |lowp - ref32| + atol (max over elements), per tensor."""
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref32, lowp):
        err = (g.float() - r.float()).abs().max().item()
        base = (t.float() - r.float()).abs().max().item()
        assert err <= 2 * base + atol, f"{what} {name}: kernel err {err:.3g} vs torch {base:.3g}"


def check_dense(b, sq, sk, h, hkv, d, causal, dtype, device=CPU, grads=True, atol=None, window=(-1, -1)):
    torch.manual_seed(sq * 131 + sk + h + d)
    q, k, v = (_rand(b, n, hh, d, device=device) for n, hh in ((sq, h), (sk, hkv), (sk, hkv)))
    do = torch.randn(b, sq, h, d, device=device)
    ref = _fwd_bwd(lambda *x: R.flash_attention(*x, causal=causal, window_size=window), [q, k, v], do)
    lq, lk, lv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    if not grads:
        got = [kernels.flash_attention(lq, lk, lv, causal=causal, window_size=window)]
        ref = ref[:1]
    else:
        got = _fwd_bwd(lambda *x: kernels.flash_attention(*x, causal=causal, window_size=window), [lq, lk, lv],
                       do.to(dtype))
    if dtype == torch.float32:
        tol = atol or 2e-4
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(g, r, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    else:
        low = _fwd_bwd(lambda *x: _lowp_attention(*x, causal, window), [lq, lk, lv], do.to(dtype))
        assert_within(got, ref, low, atol or 2e-3, f"{dtype}")


# (B, Sq, Sk, H, Hkv, D, causal): odd lengths, Sq < Sk and Sq > Sk (rows seeing no key), GQA 1/4/H
DENSE = [
    (1, 1, 1, 2, 1, 64, True),
    (2, 17, 17, 2, 2, 64, True),
    (1, 97, 130, 4, 1, 80, True),
    (1, 130, 97, 2, 2, 64, True),
    (1, 17, 40, 8, 2, 80, False),
    (1, 1, 33, 4, 4, 64, True),
    (1, 40, 17, 2, 1, 64, False),
    (1, 33, 57, 8, 2, 64, True),
    (1, 257, 257, 2, 1, 64, True),
]


@pytest.mark.parametrize("case", DENSE, ids=lambda c: "-".join(map(str, c)))
def test_dense_fp32(case):
    check_dense(*case, torch.float32)


@pytest.mark.parametrize("case", [(1, 97, 130, 4, 1, 80, True), (1, 40, 17, 4, 2, 64, True),
                                  (2, 17, 33, 2, 2, 64, False), (1, 17, 40, 2, 1, 24, True)],
                         ids=lambda c: "-".join(map(str, c)))
def test_dense_fp16(case):
    check_dense(*case, torch.float16)


# any multiple of 8 up to 256: tiles padded to a power of two (at least 16) and masked past D
HEAD_DIMS = [8, 16, 24, 40, 72, 112, 160, 256]


@pytest.mark.parametrize("d", HEAD_DIMS + [32, 96, 128])
def test_head_dims(d):
    check_dense(1, 17, 40, 2, 1, d, True, torch.float32)


def test_big_head_dims_fit_shared_memory(monkeypatch):
    # the GPU autotuner's candidates (the interpreter runs fixed blocks): at D=256 configs whose tiles
    # overflow an H100's shared memory are dropped and small ones join; fp16 up to D=128 keeps them all
    import types

    import triton

    from gpt_engine.kernels import triton_attention as T
    props = types.SimpleNamespace(get_device_properties=lambda index: {"max_shared_mem": 232448})
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=types.SimpleNamespace(utils=props)))
    for tuned, small in ((T._fwd_tuned, T._FWD_SMALL), (T._dq_tuned, T._DQ_SMALL), (T._dkdv_tuned, T._DKDV_SMALL)):
        prune = tuned.early_config_prune
        for d in (64, 128):
            assert prune(tuned.configs, {"Q": torch.empty(1, dtype=torch.float16)}, BLOCK_D=T.block_d(d)) == \
                tuned.configs
        for dtype in (torch.float16, torch.float32):
            kept = prune(tuned.configs, {"Q": torch.empty(1, dtype=dtype)}, BLOCK_D=T.block_d(256))
            assert set(small) <= set(kept) and len(kept) < len(tuned.configs) + len(small)


def test_strided_inputs():
    # q/k/v as views of one fused projection (the model's layout): no copies needed
    torch.manual_seed(0)
    b, s, h, hkv, d = 1, 33, 4, 2, 64
    qkv = torch.randn(b, s, (h + 2 * hkv) * d)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], -1)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))
    torch.testing.assert_close(kernels.flash_attention(q, k, v), R.flash_attention(q, k, v), atol=2e-4, rtol=2e-4)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _check_varlen_fwd_bwd(dtype, lq, lk, window=(-1, -1), d=64):
    """Causal varlen forward and gradients against the reference: fp32 closely, fp16 within the
    error of the same op in plain torch at fp16."""
    h, hkv = 4, 2
    q, k, v = _rand(sum(lq), h, d), _rand(sum(lk), hkv, d), _rand(sum(lk), hkv, d)
    cq, ck = _cu(lq), _cu(lk)
    do = torch.randn_like(q)

    def run(fn, x):
        return fn(*x, cq, ck, max(lq), max(lk), causal=True, window_size=window)
    ref = _fwd_bwd(lambda *x: run(R.flash_attention_varlen, x), [q, k, v], do)
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    got = _fwd_bwd(lambda *x: run(kernels.flash_attention_varlen, x), xs, do.to(dtype))
    if dtype == torch.float32:
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)
    else:
        def low(*x):
            return torch.cat([_lowp_attention(x[0][None, cq[i]:cq[i + 1]], x[1][None, ck[i]:ck[i + 1]],
                                              x[2][None, ck[i]:ck[i + 1]], True, window)[0] for i in range(len(lq))])
        assert_within(got, ref, _fwd_bwd(low, xs, do.to(dtype)), 2e-3, f"varlen fp16, window {window}")


@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 64), *((torch.float32, d) for d in HEAD_DIMS),
                                     (torch.float16, 40)])
def test_varlen_fwd_bwd(dtype, d):
    torch.manual_seed(1)
    _check_varlen_fwd_bwd(dtype, [1, 17, 40], [5, 17, 33], d=d)  # per-sequence Sq <= Sk, Sq > Sk


def test_varlen_noncausal_matches_dense():
    torch.manual_seed(2)
    lens, h, d = [17, 1, 30], 2, 80
    q, k, v = (torch.randn(sum(lens), h, d) for _ in range(3))
    cu = _cu(lens)
    got = kernels.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=False)
    ref = R.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=False)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def _paged(lens, block_size, hkv, d, dtype, extra_blocks=5):
    """Caches with each sequence's tokens in randomly permuted (scattered) blocks."""
    nblk = [(n + block_size - 1) // block_size for n in lens]
    total = sum(nblk) + extra_blocks
    kc = torch.randn(total, block_size, hkv, d).to(dtype)
    vc = torch.randn(total, block_size, hkv, d).to(dtype)
    perm = torch.randperm(total)
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[i:i + n]
        i += n
    return kc, vc, table


@pytest.mark.parametrize("dtype,block_size,d", [(torch.float32, 16, 64), (torch.float16, 32, 64),
                                                (torch.float32, 16, 8), (torch.float32, 16, 72),
                                                (torch.float32, 5, 256), (torch.float16, 16, 24)])
def test_paged_prefill(dtype, block_size, d):
    # new tokens (q) on top of a cached prefix: q are the last tokens of each sequence
    torch.manual_seed(3)
    h, hkv = 4, 2
    klens, qlens = [20, 1, 70], [20, 1, 9]  # fresh prompt, one-token chunk, chunk after a 61-token prefix
    kc, vc, table = _paged(klens, block_size, hkv, d, dtype)
    q = torch.randn(sum(qlens), h, d).to(dtype)
    args = (_cu(qlens), _cu(klens), max(qlens), max(klens))
    got = kernels.flash_attention_varlen(q, kc, vc, *args, block_table=table)
    ref = R.flash_attention_varlen(q.float(), kc.float(), vc.float(), *args, block_table=table)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
    else:
        cq = _cu(qlens)
        low = torch.cat([_lowp_attention(q[None, cq[b]:cq[b + 1]], R.gather_paged(kc, table[b], klens[b])[None],
                                         R.gather_paged(vc, table[b], klens[b])[None], True)[0]
                         for b in range(len(klens))])
        assert_within([got], [ref], [low], 2e-3, "paged prefill")


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the torch CPU path is differentiable")
def test_paged_prefill_has_no_backward():
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton path: interpreter or GPU
    kc, vc, table = (t.to(dev) for t in _paged([8], 16, 1, 64, torch.float32))
    q = torch.randn(8, 2, 64, device=dev, requires_grad=True)
    cu = _cu([8]).to(dev)
    out = kernels.flash_attention_varlen(q, kc, vc, cu, cu, 8, 8, block_table=table)
    with pytest.raises(NotImplementedError):
        out.sum().backward()


def test_compile_traces_custom_op():
    # aot_eager runs the fake (meta) registrations and the autograd formula like inductor would
    torch.manual_seed(4)
    q, k, v = _rand(1, 17, 2, 64), _rand(1, 17, 1, 64), _rand(1, 17, 1, 64)
    f = torch.compile(lambda q, k, v: kernels.flash_attention(q, k, v).square().sum(), backend="aot_eager",
                      fullgraph=True)
    got = torch.autograd.grad(f(q, k, v), (q, k, v))
    ref = torch.autograd.grad(R.flash_attention(q, k, v).square().sum(), (q, k, v))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)


def test_errors():
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="multiple"):
        kernels.flash_attention(q, k, k)
    qi = torch.zeros(1, 4, 2, 64, dtype=torch.int32)
    with pytest.raises(TypeError, match="q"):
        kernels.flash_attention(qi, qi, qi)
    with pytest.raises(ValueError, match="device|meta"):
        kernels.flash_attention(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64, device="meta"),
                                torch.randn(1, 4, 2, 64, device="meta"))
    with pytest.raises(ValueError, match="4-D"):
        kernels.flash_attention(torch.randn(4, 2, 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64))
    for d in (20, 264, 4):  # off the multiples of 8, past 256
        x = torch.randn(1, 4, 2, d)
        with pytest.raises(ValueError, match=f"head dim {d} not supported: must be a multiple of 8 up to 256"):
            kernels.flash_attention(x, x, x)
        with pytest.raises(ValueError, match=f"head dim {d} not supported"):
            kernels.flash_attention_varlen(x[0], x[0], x[0], *[torch.tensor([0, 4], dtype=torch.int32)] * 2, 4, 4)
    p = torch.randn(5, 2, 64)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        kernels.flash_attention_varlen(p, p, p, torch.tensor([0, 5]), torch.tensor([0, 5], dtype=torch.int32), 5, 5)
    with pytest.raises(ValueError, match="block_table"):
        cache = torch.randn(2, 16, 2, 64)
        cu = torch.tensor([0, 5], dtype=torch.int32)
        kernels.flash_attention_varlen(p, cache, cache, cu, cu, 5, 5, block_table=torch.zeros(2, 1, dtype=torch.int32))


# ---- CPU float32 inference: the C++ varlen kernel (csrc/varlen_cpu.cpp) ----

def _ext_or_skip():
    from gpt_engine.kernels._ext import ext
    if ext() is None:
        pytest.skip("gpt_engine.kernels._C is not built")
    return ext()


@pytest.mark.parametrize("h,hkv,d", [(4, 4, 64), (8, 2, 32), (6, 3, 80), (2, 1, 96), (3, 1, 128),
                                     *((2, 1, d) for d in HEAD_DIMS)])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_cpu_kernel(h, hkv, d, causal, monkeypatch):
    # lengths off every tile size (4 query rows, 16 keys), an empty sequence, Sk > Sq (bottom-right
    # causal) and Sq > Sk (causal rows that see no key are 0), on rows strided as split from a
    # fused projection
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ext = _ext_or_skip()
    torch.manual_seed(3)
    lq, lk = [1, 5, 0, 17, 40, 33, 3], [1, 9, 0, 17, 40, 50, 2]
    qkv = torch.randn(sum(lq), h + 2 * hkv, d)
    kv = torch.randn(sum(lk), 2 * hkv, d)
    q, k, v = qkv[:, :h], kv[:, :hkv], kv[:, hkv:]
    cq, ck = _cu(lq), _cu(lk)
    with torch.no_grad():
        got = kernels.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, softmax_scale=0.3)
    ref = R.flash_attention_varlen(q.double(), k.double(), v.double(), cq, ck, max(lq), max(lk), causal, 0.3)
    torch.testing.assert_close(got, ref.float(), atol=2e-5, rtol=2e-5)
    direct = ext.varlen_attention(q, k, v, cq, ck, causal, 0.3)
    torch.testing.assert_close(direct, got, atol=0, rtol=0)  # flash_attention_varlen took the kernel


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("h,hkv,d", [(4, 2, 64), (3, 3, 32), (2, 1, 24), (2, 2, 8), (2, 1, 256)])
def test_varlen_cpu_kernel_paged(block_size, h, hkv, d, monkeypatch):
    # chunked prefill and prefix-cache hits: new tokens on top of a cached prefix, K/V read through
    # the block table from scattered blocks (a block size off the 16-key tiles too)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ext = _ext_or_skip()
    torch.manual_seed(4)
    klens, qlens = [20, 1, 70, 33, 0], [20, 1, 9, 4, 0]
    kc, vc, table = _paged([max(n, 1) for n in klens], block_size, hkv, d, torch.float32)
    qkv = torch.randn(sum(qlens), h + 2 * hkv, d)
    q = qkv[:, :h]
    args = (_cu(qlens), _cu(klens), max(qlens), max(klens))
    with torch.no_grad():
        got = kernels.flash_attention_varlen(q, kc, vc, *args, block_table=table, softmax_scale=0.2)
    ref = R.flash_attention_varlen(q.double(), kc.double(), vc.double(), *args, softmax_scale=0.2, block_table=table)
    torch.testing.assert_close(got, ref.float(), atol=2e-5, rtol=2e-5)
    direct = ext.varlen_attention(q, kc, vc, _cu(qlens), _cu(klens), True, 0.2, table)
    torch.testing.assert_close(direct, got, atol=0, rtol=0)  # flash_attention_varlen took the kernel
    bad = table.clone()
    bad[2, 1] = kc.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        ext.varlen_attention(q, kc, vc, _cu(qlens), _cu(klens), True, 0.2, bad)
    with pytest.raises(ValueError, match="table entries"):
        ext.varlen_attention(q, kc, vc, _cu(qlens), _cu([20, 1, 70, table.shape[1] * block_size + 1, 0]), True, 0.2,
                             table)


def test_varlen_cpu_kernel_takes_strided_offsets(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _ext_or_skip()
    q = torch.randn(10, 2, 64)
    cu = torch.tensor([0, 0, 4, 4, 10, 10], dtype=torch.int32)[::2]  # (0, 4, 10), not contiguous
    with torch.no_grad():
        got = kernels.flash_attention_varlen(q, q, q, cu, cu, 6, 6)
    torch.testing.assert_close(got, R.flash_attention_varlen(q, q, q, cu, cu, 6, 6), atol=2e-5, rtol=2e-5)


def test_varlen_cpu_kernel_only_for_inference(monkeypatch):
    # the kernel has no backward: with grad, flash_attention_varlen keeps the differentiable SDPA path
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _ext_or_skip()
    from gpt_engine.kernels._dispatch import cpu_varlen_attention
    q = torch.randn(10, 2, 64)
    assert cpu_varlen_attention(q, q, q)
    assert not cpu_varlen_attention(q.requires_grad_(), q, q)
    with torch.no_grad():
        assert cpu_varlen_attention(q, q, q)
    assert not cpu_varlen_attention(q.detach().double(), q, q)
    assert not cpu_varlen_attention(q.detach().transpose(0, 1).contiguous().transpose(0, 1), q, q)  # rows not dense


def test_varlen_cpu_kernel_errors():
    ext = _ext_or_skip()
    q = torch.randn(6, 2, 64)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="offsets"):
        ext.varlen_attention(q, q, q, torch.tensor([0, 7], dtype=torch.int32), cu, True, 1.0)
    with pytest.raises(ValueError, match="offsets"):
        ext.varlen_attention(q, q, q, cu, torch.tensor([4, 0], dtype=torch.int32), True, 1.0)
    with pytest.raises(TypeError, match="cu_seqlens_q has dtype torch.int64; expected torch.int32"):
        ext.varlen_attention(q, q, q, cu.long(), cu, True, 1.0)
    with pytest.raises(TypeError, match="float32"):
        ext.varlen_attention(q.half(), q.half(), q.half(), cu, cu, True, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        ext.varlen_attention(q, torch.randn(6, 3, 64), torch.randn(6, 3, 64), cu, cu, True, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):  # the entry points' shared row check
        x = torch.randn(6, 64, 2).transpose(1, 2)
        ext.varlen_attention(x, x, x, cu, cu, True, 1.0)


# ---- sliding windows: window_size=(left, right), bottom-right aligned like causal ----

# (B, Sq, Sk, H, Hkv, D, causal, window): windows 1, 7, 64 and >= S; Sq < Sk and Sq > Sk; GQA;
# non-causal windows bounded on both sides, on one side, and right-only
WINDOWED = [
    (1, 97, 97, 2, 1, 64, True, (7, 0)),
    (2, 33, 57, 4, 2, 64, True, (1, -1)),
    (1, 130, 97, 2, 2, 64, True, (64, 0)),
    (1, 97, 130, 4, 1, 80, True, (200, 0)),
    (1, 57, 40, 4, 4, 64, False, (7, 3)),
    (1, 40, 57, 8, 2, 64, False, (64, -1)),
    (1, 57, 57, 2, 1, 64, False, (-1, 1)),
    (1, 17, 40, 2, 1, 64, False, (0, 0)),
]


@pytest.mark.parametrize("case", WINDOWED, ids=lambda c: "-".join(map(str, c)))
def test_window_fp32(case):
    *shape, window = case
    check_dense(*shape, torch.float32, window=window)


@pytest.mark.parametrize("case", [WINDOWED[0], WINDOWED[2], WINDOWED[4]], ids=lambda c: "-".join(map(str, c)))
def test_window_fp16(case):
    *shape, window = case
    check_dense(*shape, torch.float16, window=window)


def test_window_reference_is_the_band():
    # the twin itself, against the definition written out: i + Sk - Sq - left <= j <= i + Sk - Sq + right
    torch.manual_seed(9)
    sq, sk, d = 5, 9, 64
    q, k, v = torch.randn(1, sq, 1, d), torch.randn(1, sk, 1, d), torch.randn(1, sk, 1, d)
    got = R.flash_attention(q.double(), k.double(), v.double(), causal=False, window_size=(2, 1))
    for i in range(sq):
        js = [j for j in range(sk) if i + sk - sq - 2 <= j <= i + sk - sq + 1]
        p = torch.softmax(q[0, i, 0].double() @ k[0, js, 0].double().T / math.sqrt(d), -1)
        torch.testing.assert_close(got[0, i, 0], p @ v[0, js, 0].double())
    causal = R.flash_attention(q, k, v, causal=True, window_size=(2, 5))  # causal: right is 0
    torch.testing.assert_close(causal, R.flash_attention(q, k, v, causal=False, window_size=(2, 0)))
    wide = R.flash_attention(q, k, v, causal=True, window_size=(sk, 0))  # a window past every key is causal
    torch.testing.assert_close(wide, R.flash_attention(q, k, v, causal=True))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels under the interpreter")
def test_window_skips_tiles():
    # a NaN in key 0's value poisons every tile pass that reads it, masked or not (0 x NaN): with a
    # window of 8 only the first query block (32 rows on CPU) and the dk/dv tiles of its rows may
    # read it, so everything past them stays finite only if the tiles outside the band are skipped
    torch.manual_seed(16)
    q, k, v = (_rand(1, 128, 2, 64) for _ in range(3))
    with torch.no_grad():
        v[:, 0] = float("nan")
    out = kernels.flash_attention(q, k, v, causal=True, window_size=(7, 0))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert out[:, 32:].isfinite().all() and dq[:, 32:].isfinite().all()
    assert dk[:, 64:].isfinite().all() and dv[:, 1:].isfinite().all()
    full = kernels.flash_attention(q, k, v, causal=True)
    assert full[:, 32:].isnan().any()  # without a window the later rows do read key 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_window_varlen_fwd_bwd(dtype):
    torch.manual_seed(11)
    _check_varlen_fwd_bwd(dtype, [1, 17, 40, 70], [5, 17, 33, 70], window=(7, 0))


@pytest.mark.parametrize("window", [(1, 0), (16, 0), (100, 0)])
def test_window_paged_prefill(window):
    torch.manual_seed(12)
    h, hkv, d, block_size = 4, 2, 64, 16
    klens, qlens = [20, 1, 70], [20, 1, 9]
    kc, vc, table = _paged(klens, block_size, hkv, d, torch.float32)
    q = torch.randn(sum(qlens), h, d)
    args = (_cu(qlens), _cu(klens), max(qlens), max(klens))
    got = kernels.flash_attention_varlen(q, kc, vc, *args, block_table=table, window_size=window)
    ref = R.flash_attention_varlen(q, kc, vc, *args, block_table=table, window_size=window)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sq,sk", [(5, 23), (23, 5), (1, 9)])
@pytest.mark.parametrize("window", [(-1, -1), (3, 0)])
def test_sdpa_path_bottom_right(dtype, sq, sk, window, monkeypatch):
    # plain CPU (no interpreter): flash_attention runs torch SDPA with its own mask, which must align
    # causal and windows bottom-right (a top-left mask would pass square shapes only), with grads
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(sq + sk)
    q, k, v = _rand(2, sq, 4, 64, dtype=dtype), _rand(2, sk, 2, 64, dtype=dtype), _rand(2, sk, 2, 64, dtype=dtype)
    do = torch.randn(2, sq, 4, 64, dtype=dtype)
    got = _fwd_bwd(lambda *x: kernels.flash_attention(*x, causal=True, window_size=window), [q, k, v], do)
    ref = _fwd_bwd(lambda *x: R.flash_attention(*x, causal=True, window_size=window), [q, k, v], do)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [(7, 0), (0, 0), (-1, 3), (5, 2)])
def test_sdpa_varlen_window(window, monkeypatch):
    # the per-sequence SDPA fallback (float64 here) with a window, causal and not
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(13)
    lq, lk = [3, 17, 1], [9, 17, 6]
    q, k, v = torch.randn(sum(lq), 4, 64).double(), torch.randn(sum(lk), 2, 64).double(), torch.randn(sum(lk), 2, 64).double()
    for causal in (True, False):
        args = (q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), causal, None)
        got = kernels.flash_attention_varlen(*args, window_size=window)
        torch.testing.assert_close(got, R.flash_attention_varlen(*args, window_size=window))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [(1, 0), (7, 0), (64, 0), (500, 0), (7, 3), (-1, 2)])
def test_varlen_cpu_kernel_window(causal, window, monkeypatch):
    # the C++ kernel's tiles start at their first row's first key: windows off the 16-key blocks,
    # Sq < Sk and Sq > Sk, an empty sequence, GQA
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ext = _ext_or_skip()
    torch.manual_seed(14)
    h, hkv, d = 6, 2, 64
    lq, lk = [1, 5, 0, 17, 40, 33, 90], [1, 9, 0, 17, 40, 50, 70]
    q, k, v = torch.randn(sum(lq), h, d), torch.randn(sum(lk), hkv, d), torch.randn(sum(lk), hkv, d)
    cq, ck = _cu(lq), _cu(lk)
    with torch.no_grad():
        got = kernels.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window)
    ref = R.flash_attention_varlen(q.double(), k.double(), v.double(), cq, ck, max(lq), max(lk), causal,
                                   window_size=window)
    torch.testing.assert_close(got, ref.float(), atol=2e-5, rtol=2e-5)
    left, right = window
    direct = ext.varlen_attention(q, k, v, cq, ck, causal, 1 / 8, None, left, 0 if causal else right)
    torch.testing.assert_close(direct, got, atol=0, rtol=0)  # flash_attention_varlen took the kernel


@pytest.mark.parametrize("block_size", [16, 5])
def test_varlen_cpu_kernel_paged_window(block_size, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _ext_or_skip()
    torch.manual_seed(15)
    h, hkv, d = 4, 2, 64
    klens, qlens = [20, 1, 70, 33], [20, 1, 9, 4]
    kc, vc, table = _paged(klens, block_size, hkv, d, torch.float32)
    q = torch.randn(sum(qlens), h, d)
    args = (_cu(qlens), _cu(klens), max(qlens), max(klens))
    for window in ((7, 0), (30, 0)):
        with torch.no_grad():
            got = kernels.flash_attention_varlen(q, kc, vc, *args, block_table=table, window_size=window)
        ref = R.flash_attention_varlen(q.double(), kc.double(), vc.double(), *args, block_table=table,
                                       window_size=window)
        torch.testing.assert_close(got, ref.float(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad,exc", [((-2, 0), ValueError), ((0, -5), ValueError), ((1.5, 0), TypeError),
                                     ((3,), TypeError), (5, TypeError), ((True, 0), TypeError)])
def test_window_errors(bad, exc):
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(exc, match="window_size"):
        kernels.flash_attention(q, q, q, window_size=bad)
    cu = _cu([4])
    with pytest.raises(exc, match="window_size"):
        kernels.flash_attention_varlen(q[0], q[0], q[0], cu, cu, 4, 4, window_size=bad)


# ---- GPU: realistic sizes, low precision, compile ----

GPU_DENSE = [(2, 1024, 1024, 16, 16, 128, True), (2, 2048, 2048, 16, 4, 64, True),
             (4, 1024, 1024, 16, 1, 128, False), (2, 1000, 1537, 16, 4, 80, True), (2, 1537, 1000, 16, 8, 64, True),
             (1, 1000, 1537, 8, 2, 256, True), (2, 777, 777, 4, 1, 8, True), (1, 1537, 1000, 4, 2, 40, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_DENSE, ids=lambda c: "-".join(map(str, c)))
def test_gpu_dense(case, dtype):
    check_dense(*case, dtype, device=torch.device("cuda"))


GPU_WINDOWED = [(2, 2048, 2048, 16, 4, 128, True, (255, 0)), (2, 1000, 1537, 16, 8, 64, True, (64, 0)),
                (1, 1537, 1000, 16, 16, 128, False, (127, 127))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_WINDOWED, ids=lambda c: "-".join(map(str, c)))
def test_gpu_window(case, dtype):
    *shape, window = case
    check_dense(*shape, dtype, device=torch.device("cuda"), window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 256])  # 256: _smem_prune's small configs
def test_gpu_fp32(d):
    check_dense(2, 257, 257, 8, 2, d, True, torch.float32, device=torch.device("cuda"), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_varlen(dtype):
    torch.manual_seed(5)
    dev = torch.device("cuda")
    lens, h, hkv, d = [1, 700, 2048, 333], 16, 4, 128
    cu = _cu(lens).to(dev)
    q, k, v = _rand(sum(lens), h, d, device=dev), _rand(sum(lens), hkv, d, device=dev), _rand(sum(lens), hkv, d,
                                                                                                 device=dev)
    do = torch.randn_like(q)
    ref = _fwd_bwd(lambda *x: R.flash_attention_varlen(*x, cu, cu, max(lens), max(lens)), [q, k, v], do)
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    got = _fwd_bwd(lambda *x: kernels.flash_attention_varlen(*x, cu, cu, max(lens), max(lens)), xs, do.to(dtype))

    def low(*x):
        c = cu.tolist()
        return torch.cat([_lowp_attention(*(t[None, c[i]:c[i + 1]] for t in x), True)[0] for i in range(len(lens))])
    assert_within(got, ref, _fwd_bwd(low, xs, do.to(dtype)), 2e-3, "gpu varlen")


@pytest.mark.gpu
def test_gpu_paged_prefill():
    torch.manual_seed(6)
    dtype, h, hkv, d = torch.bfloat16, 16, 4, 128
    klens, qlens = [1500, 64, 2000], [300, 64, 1]
    kc, vc, table = _paged(klens, 16, hkv, d, dtype, extra_blocks=50)
    kc, vc, table = kc.cuda(), vc.cuda(), table.cuda()
    q = torch.randn(sum(qlens), h, d, device="cuda", dtype=dtype)
    args = (_cu(qlens).cuda(), _cu(klens).cuda(), max(qlens), max(klens))
    got = kernels.flash_attention_varlen(q, kc, vc, *args, block_table=table)
    ref = R.flash_attention_varlen(q.float(), kc.float(), vc.float(), *args, block_table=table)
    cq = _cu(qlens)
    low = torch.cat([_lowp_attention(q[None, cq[b]:cq[b + 1]], R.gather_paged(kc, table[b], klens[b])[None],
                                     R.gather_paged(vc, table[b], klens[b])[None], True)[0] for b in range(3)])
    assert_within([got], [ref], [low], 2e-3, "gpu paged prefill")


@pytest.mark.gpu
def test_gpu_torch_compile_fwd_bwd():
    torch.manual_seed(7)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    q, k, v = (_rand(2, 1024, hh, 64, device=dev) for hh in (16, 4, 4))

    def f(q, k, v):
        return (kernels.flash_attention(q * 1.0, k, v, causal=True) * 2.0).float().square().sum()
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*xs), xs)
    ref = torch.autograd.grad(f(*xs), xs)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=2e-2)  # same kernels, O(1) grads
