"""CPU GEMM micro-benchmarks (pytest-benchmark): kernels.linear's fp32 inference kernel
(csrc/linear_cpu.cpp) against torch (F.linear + activation, MKL), on a decode step of
gpt2-tiny's layers: 4 layers' weights plus the LM head, cycled the way a decode step reads them
(16.6 MB, more than L2, so the weights come from L3 as in the engine).

    python -m pytest benchmarks/test_bench_linear.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels


def _layers(d=256, n_layer=4, vocab=4096):
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * d, d, None), (d, d, None), (4 * d, d, "gelu_tanh"), (d, 4 * d, None)]
    layers = [[(torch.randn(n, k, generator=g), torch.randn(n, generator=g), act) for n, k, act in shapes]
              for _ in range(n_layer)]
    return layers, torch.randn(vocab, d, generator=g)


def _step(op, layers, head, x, h):
    for layer in layers:
        for w, b, act in layer:
            op(h if w.shape[1] != x.shape[1] else x, w, b, act)
    op(x, head, None, None)


OPS = {"kernels": lambda x, w, b, act: kernels.linear(x, w, b, act),
       "torch": lambda x, w, b, act: F.gelu(F.linear(x, w, b), approximate="tanh") if act else F.linear(x, w, b)}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows", [8, 32, 128])
def test_decode_step_gemms(benchmark, op, rows):
    layers, head = _layers()
    x, h = torch.randn(rows, 256), torch.randn(rows, 1024)
    with torch.no_grad():
        benchmark(_step, OPS[op], layers, head, x, h)
