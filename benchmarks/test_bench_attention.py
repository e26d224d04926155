"""CPU attention micro-benchmarks (pytest-benchmark): kernels.flash_attention's CPU path (torch
SDPA) against the plain reference, forward and forward+backward; kernels.flash_attention_varlen's
C++ prefill (float32 inference) against torch SDPA once per sequence; kernels.paged_attention's C++
decode against gathering the blocks for torch SDPA.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

from gpt_engine import kernels
from gpt_engine.kernels import reference as R
from gpt_engine.kernels.attention import sdpa
from gpt_engine.kernels.paged import _paged_sdpa

# B, S, H, Hkv, D: a small model's prefill, with GQA
SHAPES = [(1, 256, 8, 8, 64), (1, 512, 8, 2, 64)]
OPS = {"kernels": kernels.flash_attention, "reference": R.flash_attention}


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # time the fast CPU path, not the Triton interpreter
    assert os.environ["TRITON_INTERPRET"] == "0"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fwd(benchmark, op, shape):
    b, s, h, hkv, d = shape
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    with torch.no_grad():
        benchmark(OPS[op], q, k, v, True)


@pytest.mark.parametrize("op", OPS)
def test_fwd_bwd(benchmark, op):
    b, s, h, hkv, d = SHAPES[0]
    q, k, v = (torch.randn(b, s, n, d, requires_grad=True) for n in (h, hkv, hkv))

    def step():
        OPS[op](q, k, v, True).sum().backward()
    benchmark(step)


# paged decode: B sequences of 8-200 cached tokens in scattered 16-token blocks (an engine step)
DECODE = {"kernels": kernels.paged_attention,  # csrc/paged_cpu.cpp
          "torch-gather-sdpa": lambda q, kc, vc, t, n: _paged_sdpa(q, kc, vc, t, n, q.shape[-1] ** -0.5)}


@pytest.mark.parametrize("op", DECODE)
@pytest.mark.parametrize("heads", [(4, 4, 64), (32, 8, 128)], ids=lambda h: "H{}-Hkv{}-D{}".format(*h))
def test_paged_decode(benchmark, op, heads):
    h, hkv, d = heads
    g = torch.Generator().manual_seed(0)
    B, bs, width = 32, 16, 13
    lens = torch.randint(8, 200, (B,), dtype=torch.int32, generator=g)
    kc, vc = (torch.randn(B * width, bs, hkv, d, generator=g) for _ in range(2))
    table = torch.randperm(B * width, generator=g).to(torch.int32).view(B, width)
    q = torch.randn(B, h, d, generator=g)
    benchmark(DECODE[op], q, kc, vc, table, lens)


# varlen prefill: an engine step's 32 prompts of 8-128 tokens, packed (the bench's workload)
def _sdpa_per_sequence(q, k, v, cu):
    out, c = torch.empty_like(q), cu.tolist()
    for b in range(len(c) - 1):
        out[c[b]:c[b + 1]] = sdpa(q[None, c[b]:c[b + 1]], k[None, c[b]:c[b + 1]], v[None, c[b]:c[b + 1]], True,
                                  q.shape[-1] ** -0.5)[0]
    return out


PREFILL = {"kernels": lambda q, k, v, cu: kernels.flash_attention_varlen(q, k, v, cu, cu, 128, 128),  # varlen_cpu.cpp
           "torch-sdpa-per-sequence": _sdpa_per_sequence}


@pytest.mark.parametrize("op", PREFILL)
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 32)], ids=lambda h: "H{}-Hkv{}-D{}".format(*h))
def test_varlen_prefill(benchmark, op, heads):
    h, hkv, d = heads
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 129, (32,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    qkv = torch.randn(int(cu[-1]), h + 2 * hkv, d, generator=g)  # rows strided, as from the fused projection
    q, k, v = qkv.split([h, hkv, hkv], dim=1)
    with torch.no_grad():
        benchmark(PREFILL[op], q, k, v, cu)
