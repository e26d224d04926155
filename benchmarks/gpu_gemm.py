"""bf16 GEMM on the GPU: kernels.linear's GEMM (CUTLASS sm90 kernels on Hopper (H100, H200), else mma.sync) vs
torch (cuBLAS), TFLOP/s; the fused bias+GELU epilogue vs torch's two ops (F.linear then F.gelu);
the backward GEMMs (dgrad dz @ w, wgrad dz^T @ x) vs torch's matmuls; and for decode-sized batches the
weight-only int8 GEMM (kernels.quant.linear_int8, Triton w8a16) vs torch's bf16 F.linear, in GB/s of weight
streamed (decode is bound by it)."""
from __future__ import annotations

from pathlib import Path

from .common import bench_ms, md_table, save_rows

# (name, M, K, N): y (M, N) = x (M, K) @ w (N, K)^T
SHAPES = [
    ("gpt2 qkv", 8192, 768, 2304),
    ("gpt2 fc", 8192, 768, 3072),
    ("gpt2 proj", 8192, 3072, 768),
    ("llama qkvo", 8192, 4096, 4096),
    ("llama up", 8192, 4096, 11008),
    ("llama down", 8192, 11008, 4096),
]


def _row(name, m, k, n, act):
    import torch
    import torch.nn.functional as F

    from gpt_engine import kernels
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if act else None
    flop = 2 * m * n * k
    with torch.no_grad():
        ours = bench_ms(lambda: kernels.linear(x, w, b, act, backend="custom"))
        if act is None:
            ref = bench_ms(lambda: torch.matmul(x, w.t()))
        else:
            gelu = (lambda t: F.gelu(t)) if act == "gelu" else (lambda t: F.gelu(t, approximate="tanh"))
            ref = bench_ms(lambda: gelu(F.linear(x, w, b)))
    return dict(shape=name, M=m, K=k, N=n, op="fwd", epilogue=f"bias+{act}" if act else "none", ms=ours,
                torch_ms=ref, tflops=flop / ours / 1e9, torch_tflops=flop / ref / 1e9, x_torch=ref / ours,
                kernel=_kernel(x, w))


def _kernel(a, b):
    from gpt_engine.kernels import _C
    return "sm90" if _C.gemm_sm90(a, b) else "mma.sync"


def _backward_rows(name, m, k, n):
    import torch

    from gpt_engine.kernels import _C
    dz = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    flop = 2 * m * n * k
    rows = []
    for op, ours, ref in [("dgrad", lambda: _C.gemm_dgrad(dz, w), lambda: dz @ w),
                          ("wgrad", lambda: _C.gemm_wgrad(dz, x), lambda: dz.t() @ x)]:
        t, r = bench_ms(ours), bench_ms(ref)
        rows.append(dict(shape=name, M=m, K=k, N=n, op=op, epilogue="none", ms=t, torch_ms=r, tflops=flop / t / 1e9,
                         torch_tflops=flop / r / 1e9, x_torch=r / t, kernel=_kernel(dz, w.t())))
    return rows


# (name, K, N) of the decode GEMMs, and the batch sizes (rows) the w8a16 kernel serves
W8A16_SHAPES = [("gpt2 fc", 768, 3072), ("llama qkvo", 4096, 4096), ("llama up", 4096, 11008),
                ("llama down", 11008, 4096)]
W8A16_ROWS = (1, 16, 64)


def _w8a16_rows():
    import torch
    import torch.nn.functional as F

    from gpt_engine.kernels.quant import linear_int8, quantize_int8
    rows = []
    for name, k, n in W8A16_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        for group in (None, 128):
            qw = quantize_int8(w, group)
            for m in W8A16_ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                try:
                    with torch.no_grad():
                        ours, ref = bench_ms(lambda: linear_int8(x, qw)), bench_ms(lambda: F.linear(x, w))
                    gb = qw.q.numel() + qw.scale.numel() * 4
                    rows.append(dict(shape=name, M=m, K=k, N=n, group=group or "channel", ms=ours, torch_bf16_ms=ref,
                                     weight_gbps=gb / ours / 1e6, torch_gbps=2 * n * k / ref / 1e6, x_torch=ref / ours))
                except Exception as e:
                    rows.append(dict(shape=name, M=m, K=k, N=n, group=group or "channel",
                                     error=f"{type(e).__name__}: {e}"[:200]))
        torch.cuda.empty_cache()
    return rows


def main(outdir: Path) -> str:
    import torch
    rows = []
    for name, m, k, n in SHAPES:
        for act in (None, "gelu", "gelu_tanh"):
            try:
                rows.append(_row(name, m, k, n, act))
            except Exception as e:  # one failing config must not sink the suite
                rows.append(dict(shape=name, M=m, K=k, N=n, epilogue=act, error=f"{type(e).__name__}: {e}"[:200]))
            torch.cuda.empty_cache()
        try:
            rows += _backward_rows(name, m, k, n)
        except Exception as e:
            rows.append(dict(shape=name, M=m, K=k, N=n, op="backward", error=f"{type(e).__name__}: {e}"[:200]))
        torch.cuda.empty_cache()
    save_rows(outdir, "gemm", rows)
    w8 = _w8a16_rows()
    save_rows(outdir, "gemm_w8a16", w8)
    return ("## GEMM (bf16, kernels.linear vs torch: matmul/cuBLAS, or F.linear + F.gelu for fused epilogues)\n\n"
            "x_torch > 1 means faster than torch. Goals: >= 0.9x cuBLAS, fused epilogue >= 1.1x.\n\n"
            + md_table(rows, ["shape", "M", "K", "N", "op", "epilogue", "kernel", "ms", "tflops", "torch_tflops",
                              "x_torch", "error"])
            + "\n\n## Weight-only int8 GEMM (Triton w8a16) vs torch bf16 F.linear, decode-sized batches\n\n"
            "weight_gbps: bytes of int8 weight + scales per second; x_torch > 1 means faster than bf16.\n\n"
            + md_table(w8, ["shape", "M", "K", "N", "group", "ms", "torch_bf16_ms", "weight_gbps", "torch_gbps",
                            "x_torch", "error"]))
