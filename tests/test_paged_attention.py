"""paged_attention (split-K decode) and store_kvcache vs kernels.reference."""
from __future__ import annotations

import math
import os

import pytest
import torch

from gpt_engine.kernels import paged_attention, reference as R
from gpt_engine.kernels.paged import store_kvcache


def _caches(lens, block_size, hkv, d, dtype, device="cpu", extra_blocks=7):
    """Caches whose sequences live in randomly permuted (scattered) blocks; table padded with 0s."""
    nblk = [(n + block_size - 1) // block_size for n in lens]
    total = sum(nblk) + extra_blocks
    kc = torch.randn(total, block_size, hkv, d, device=device).to(dtype)
    vc = torch.randn(total, block_size, hkv, d, device=device).to(dtype)
    perm = torch.randperm(total)
    table = torch.zeros(len(lens), max(nblk) + 1, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[i:i + n]
        i += n
    return kc, vc, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def _lowp_decode(q, kc, vc, table, seq_lens, window=(-1, -1)):
    """The same decode in plain torch at the inputs' own precision."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        kb, vb = R.gather_paged(kc, table[b], n), R.gather_paged(vc, table[b], n)
        outs.append(R._attend(q[b:b + 1], kb, vb, False, scale, window)[0])
    return torch.stack(outs)


def check_decode(lens, block_size, h, hkv, d, dtype, device="cpu", atol=2e-3, window=(-1, -1)):
    torch.manual_seed(sum(lens) + block_size + h)
    kc, vc, table, seq_lens = _caches(lens, block_size, hkv, d, dtype, device)
    q = torch.randn(len(lens), h, d, device=device).to(dtype)
    got = paged_attention(q, kc, vc, table, seq_lens, window_size=window)
    ref = R.paged_attention(q.float(), kc.float(), vc.float(), table, seq_lens, window_size=window)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
        return
    err = (got.float() - ref).abs().max().item()
    base = (_lowp_decode(q, kc, vc, table, seq_lens, window).float() - ref).abs().max().item()
    assert err <= 2 * base + atol, f"kernel err {err:.3g} vs torch {base:.3g}"


# (lens, block_size, H, Hkv, D): mixed lengths incl. 1 and block edges, GQA 1 / 4 / H; any head
# dim a multiple of 8 up to 256
DECODE = [
    ([1, 16, 17, 100], 16, 8, 2, 64),
    ([33, 5, 64], 32, 4, 4, 80),
    ([100, 1], 16, 4, 1, 128),
    *(([17, 40, 1], 16, 4, 2, d) for d in (8, 16, 24, 40, 72, 112, 160, 256)),
]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest without a GPU
# CPU tensors run Triton under the interpreter, else csrc/paged_cpu.cpp (gpt_engine.kernels._C)
PATHS = [pytest.param("1", id="triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="Triton on CPU tensors needs the interpreter")), pytest.param("0", id="cpu")]


@pytest.mark.parametrize("interpret", PATHS)
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_decode_fp32(case, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    check_decode(*case, torch.float32)


@pytest.mark.parametrize("interpret", PATHS)
@pytest.mark.parametrize("case", DECODE[:2] + DECODE[5:6], ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_decode_fp16(case, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    check_decode(*case, torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_decode_cpu_bf16_fp64(dtype, monkeypatch):
    # bf16 runs the C++ kernel (the interpreter's bf16 dot is broken), float64 the batched SDPA
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_decode([1, 16, 17, 100, 250], 16, 8, 2, 64, dtype, atol=2e-2)


def test_decode_cpu_strided_q(monkeypatch):
    # q split from a fused (N, (H + 2 Hkv) D) projection: rows strided, each row dense
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kc, vc, table, seq_lens = _caches([7, 40], 16, 2, 32, torch.float32)
    qkv = torch.randn(2, 8, 32)
    q = qkv[:, :4]
    torch.testing.assert_close(paged_attention(q, kc, vc, table, seq_lens),
                               R.paged_attention(q.contiguous(), kc, vc, table, seq_lens), atol=2e-4, rtol=2e-4)


def test_cpu_kernel_rejects_bad_tables(monkeypatch):
    # the C++ kernel reads blocks straight from the table: bad entries must raise, not read wild memory
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kc, vc, table, seq_lens = _caches([20], 16, 2, 32, torch.float32)
    q = torch.randn(1, 2, 32)
    bad = table.clone()
    bad[0, 1] = kc.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(q, kc, vc, bad, seq_lens)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(q, kc, vc, table, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(q, kc, vc, table, torch.tensor([table.shape[1] * 16 + 1], dtype=torch.int32))
    k = torch.randn(1, 2, 32)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(k, k, kc, vc, torch.tensor([kc.shape[0] * 16]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interpret", PATHS)
def test_store_kvcache(monkeypatch, interpret, dtype):
    # Triton (interpreter), the C++ kernel (fp32) and the torch index_copy_ fallback (float64)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch.manual_seed(0)
    kc, vc = torch.zeros(4, 16, 2, 80, dtype=dtype), torch.zeros(4, 16, 2, 80, dtype=dtype)
    kv = torch.randn(5, 2, 2, 80, dtype=dtype)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as from a fused projection
    slots = torch.tensor([3, -1, 17, 63, 0])
    store_kvcache(k, v, kc, vc, slots)
    written = slots >= 0
    torch.testing.assert_close(kc.view(-1, 2, 80)[slots[written]], k[written], atol=0, rtol=0)
    torch.testing.assert_close(vc.view(-1, 2, 80)[slots[written]], v[written], atol=0, rtol=0)
    touched = kc.view(-1, 160).abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [0, 3, 17, 63]


def test_decode_after_store():
    # the engine's step: write the new token, then attend over the cache including it
    torch.manual_seed(1)
    lens, bs = [5, 20], 16
    kc, vc, table, seq_lens = _caches([n - 1 for n in lens], bs, 2, 64, torch.float32)
    seq_lens = seq_lens + 1
    slots = torch.tensor([int(table[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)])
    k, v, q = torch.randn(2, 2, 64), torch.randn(2, 2, 64), torch.randn(2, 4, 64)
    store_kvcache(k, v, kc, vc, slots)
    torch.testing.assert_close(paged_attention(q, kc, vc, table, seq_lens),
                               R.paged_attention(q, kc, vc, table, seq_lens), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("interpret", PATHS)
@pytest.mark.parametrize("d", [20, 264])
def test_head_dim_errors(d, interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    kc, vc, table, seq_lens = _caches([5], 16, 2, d, torch.float32)
    with pytest.raises(ValueError, match=f"head dim {d} not supported: must be a multiple of 8 up to 256"):
        paged_attention(torch.randn(1, 4, d), kc, vc, table, seq_lens)


def test_errors():
    kc, vc, table, seq_lens = _caches([5], 16, 2, 64, torch.float32)
    q = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q, kc, vc, table, seq_lens)
    q = torch.randn(1, 4, 64)
    with pytest.raises(TypeError, match="seq_lens"):
        paged_attention(q, kc, vc, table, seq_lens.long())
    with pytest.raises(TypeError, match="q"):
        paged_attention(q.int(), kc, vc, table, seq_lens)
    with pytest.raises(ValueError, match="device|meta"):
        paged_attention(q, kc.to("meta"), vc.to("meta"), table, seq_lens)
    with pytest.raises(ValueError, match="4-D"):
        paged_attention(q, kc[0], vc[0], table, seq_lens)
    with pytest.raises(ValueError, match="batch"):
        paged_attention(torch.randn(2, 4, 64), kc, vc, table, seq_lens)
    k = torch.randn(2, 2, 64)
    with pytest.raises(TypeError, match="slot_mapping"):
        store_kvcache(k, k, kc, vc, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="entries"):
        store_kvcache(k, k, kc, vc, torch.tensor([0]))
    with pytest.raises(ValueError, match="match"):
        store_kvcache(torch.randn(2, 2, 32), torch.randn(2, 2, 32), kc, vc, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="device|meta"):
        store_kvcache(k, k, kc.to("meta"), vc.to("meta"), torch.tensor([0, 1]))


# ---- sliding windows: the query (the last cached token) sees its last left + 1 keys ----

@pytest.mark.parametrize("interpret", PATHS)
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (7, -1), (64, 0), (300, 0)])
def test_decode_window_fp32(window, interpret, monkeypatch):
    # windows inside one block, across block edges, and wider than every sequence; GQA
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    check_decode([1, 16, 17, 100, 250], 16, 8, 2, 64, torch.float32, window=window)


@pytest.mark.parametrize("interpret", PATHS)
def test_decode_window_fp16(interpret, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    check_decode([33, 5, 64, 90], 32, 4, 4, 80, torch.float16, window=(20, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_decode_window_cpu_bf16_fp64(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_decode([1, 16, 17, 100, 250], 16, 8, 2, 64, dtype, atol=2e-2, window=(31, 0))


@pytest.mark.parametrize("interpret", PATHS)
def test_decode_window_reads_only_its_blocks(interpret, monkeypatch):
    # blocks wholly before the window are never read: NaN there must not reach the output
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    kc, vc, table, seq_lens = _caches([100, 40], 16, 2, 64, torch.float32)
    for b, n in enumerate(seq_lens.tolist()):
        early = table[b, :(n - 1 - 20) // 16].long()  # blocks holding only tokens before n - 1 - 20
        kc[early], vc[early] = float("nan"), float("nan")
    q = torch.randn(2, 4, 64)
    got = paged_attention(q, kc, vc, table, seq_lens, window_size=(20, 0))
    assert got.isfinite().all()
    ref = R.paged_attention(q, kc.nan_to_num(), vc.nan_to_num(), table, seq_lens, window_size=(20, 0))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bad,exc", [((-2, 0), ValueError), ((1.0, 0), TypeError), (None, TypeError)])
def test_window_errors(bad, exc):
    kc, vc, table, seq_lens = _caches([5], 16, 2, 64, torch.float32)
    with pytest.raises(exc, match="window_size"):
        paged_attention(torch.randn(1, 4, 64), kc, vc, table, seq_lens, window_size=bad)


# ---- GPU: realistic decode batches ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [([1, 16, 17, 100, 4096, 777, 2048, 33], 16, 32, 8, 128),
                                  ([5000], 16, 32, 8, 128), ([300] * 64, 32, 16, 16, 64),
                                  ([1, 999, 12000], 16, 32, 1, 128), ([1, 33, 2000], 16, 8, 2, 256),
                                  ([7, 500], 16, 8, 8, 8)], ids=lambda c: f"B{len(c[0])}-{c[1]}-{c[3]}-{c[4]}")
def test_gpu_decode(case, dtype):
    check_decode(*case, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [(0, 0), (255, 0), (4095, 0)])
def test_gpu_decode_window(window):
    check_decode([1, 16, 17, 100, 4096, 777, 2048, 33, 12000], 16, 32, 8, 128, torch.bfloat16, window=window)


@pytest.mark.gpu
def test_gpu_store_kvcache():
    kc, vc = torch.zeros(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16), torch.zeros_like(
        torch.empty(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16))
    k, v = (torch.randn(100, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(64 * 16, device="cuda")[:100]
    slots[::7] = -1
    store_kvcache(k, v, kc, vc, slots)
    keep = slots >= 0
    assert torch.equal(kc.view(-1, 8, 128)[slots[keep]], k[keep])
    assert torch.equal(vc.view(-1, 8, 128)[slots[keep]], v[keep])
    assert int((kc.view(-1, 1024).abs().sum(-1) > 0).sum()) == int(keep.sum())
