"""CPU attention micro-benchmarks (pytest-benchmark): kernels.flash_attention's CPU path (torch
SDPA) against the plain reference, forward and forward+backward.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels import reference as R

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
