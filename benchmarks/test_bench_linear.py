"""CPU GEMM micro-benchmarks (pytest-benchmark): kernels.linear's fp32 inference kernel and the
engine's packed-weight kernel (kernels.packed_linear; both csrc/linear_cpu.cpp) against
torch (F.linear + activation, MKL), on a decode step of
gpt2-tiny's layers: 4 layers' weights plus the LM head, cycled the way a decode step reads them
(16.6 MB, more than L2, so the weights come from L3 as in the engine).

    python -m pytest benchmarks/test_bench_linear.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt_engine import kernels
from gpt_engine.kernels import pack_linear, packed_linear


def _layers(d=256, n_layer=4, vocab=4096):
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * d, d, None), (d, d, None), (4 * d, d, "gelu_tanh"), (d, 4 * d, None)]
    layers = [[(torch.randn(n, k, generator=g), torch.randn(n, generator=g), act) for n, k, act in shapes]
              for _ in range(n_layer)]
    return layers, torch.randn(vocab, d, generator=g)


def _packed(layers, head):
    """The same weights packed once (as GPT.pack_for_cpu does), for the packed op."""
    return [[(pack_linear(w), b, act) for w, b, act in layer] for layer in layers], pack_linear(head)


def _step(op, layers, head, x, h):
    for layer in layers:
        for w, b, act in layer:
            k = w.weight.shape[1] if isinstance(w, tuple) else w.shape[1]
            op(h if k != x.shape[1] else x, w, b, act)
    op(x, head, None, None)


OPS = {"kernels": lambda x, w, b, act: kernels.linear(x, w, b, act),
       "packed": lambda x, w, b, act: packed_linear(x, w, b, act),
       "torch": lambda x, w, b, act: F.gelu(F.linear(x, w, b), approximate="tanh") if act else F.linear(x, w, b)}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows", [8, 32, 128])
def test_decode_step_gemms(benchmark, op, rows):
    layers, head = _layers()
    if op == "packed":
        layers, head = _packed(layers, head)
    x, h = torch.randn(rows, 256), torch.randn(rows, 1024)
    with torch.no_grad():
        benchmark(_step, OPS[op], layers, head, x, h)
