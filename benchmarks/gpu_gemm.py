"""bf16 GEMM on the GPU: kernels.linear's GEMM (CUTLASS sm90 kernels on Hopper (H100, H200), else mma.sync) vs
torch (cuBLAS), TFLOP/s; the fused bias+GELU epilogue vs torch's two ops (F.linear then F.gelu);
and the backward GEMMs (dgrad dz @ w, wgrad dz^T @ x) vs torch's matmuls."""
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
    return ("## GEMM (bf16, kernels.linear vs torch: matmul/cuBLAS, or F.linear + F.gelu for fused epilogues)\n\n"
            "x_torch > 1 means faster than torch. Goals: >= 0.9x cuBLAS, fused epilogue >= 1.1x.\n\n"
            + md_table(rows, ["shape", "M", "K", "N", "op", "epilogue", "kernel", "ms", "tflops", "torch_tflops",
                              "x_torch", "error"]))
