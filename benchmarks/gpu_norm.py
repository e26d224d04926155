"""LayerNorm / RMSNorm on the GPU: achieved GB/s of kernels' norms vs torch eager and torch.compile,
bf16, forward and forward+backward, with and without the fused residual add. A device-to-device
copy is the practical HBM peak."""
from __future__ import annotations

from pathlib import Path

from .common import bench_ms, md_table, plot_lines, save_rows

HIDDEN = [768, 1024, 2048, 4096, 8192, 12288, 16384]
ELEMS = 48 * 2 ** 20  # rows * hidden


def _copy_peak_gbs() -> float:
    import torch
    a = torch.empty(256 * 2 ** 20, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / ms / 1e6


def _impls(op: str, residual: bool):
    import torch
    import torch.nn.functional as F

    from gpt_engine import kernels

    def ours(x, w, b, r):
        return kernels.layer_norm(x, w, b, 1e-5, r) if op == "layer" else kernels.rms_norm(x, w, 1e-6, r)

    def eager(x, w, b, r):
        h = x if r is None else x + r
        n = h.shape[-1:]
        y = F.layer_norm(h, n, w, b, 1e-5) if op == "layer" else F.rms_norm(h, n, w, 1e-6)
        return y if r is None else (y, h)

    return {"kernels": ours, "torch": eager, "torch.compile": torch.compile(eager, dynamic=True)}


def _bench_one(fn, op, n, residual, mode):
    import torch
    rows = ELEMS // n
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if op == "layer" else None
    r = torch.randn_like(x) if residual else None
    e = x.element_size() * x.numel()
    if mode == "fwd":
        moved = e * (2 + 2 * residual)  # x (+ residual) in, y (+ h) out
        with torch.no_grad():
            ms = bench_ms(lambda: fn(x, w, b, r))
    else:
        # fwd as above; bwd reads h and dy (+ dh), writes dx
        moved = e * (2 + 2 * residual) + e * (3 + residual)
        leaves = [t.requires_grad_(True) for t in (x, w, b, r) if t is not None]
        outs = fn(x, w, b, r)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]

        def step():
            o = fn(x, w, b, r)
            torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)
            for t in leaves:
                t.grad = None
        ms = bench_ms(step)
    return ms, moved / ms / 1e6


def main(outdir: Path) -> str:
    import torch
    peak = _copy_peak_gbs()
    rows = []
    for op in ("layer", "rms"):
        for residual in (False, True):
            impls = _impls(op, residual)
            for mode in ("fwd", "fwd+bwd"):
                for n in HIDDEN:
                    res = {}
                    for name, fn in impls.items():
                        try:
                            ms, gbs = _bench_one(fn, op, n, residual, mode)
                            res[name] = gbs
                            rows.append(dict(op=op, residual=residual, mode=mode, hidden=n, impl=name, ms=ms,
                                             gbs=gbs, pct_peak=100 * gbs / peak))
                        except Exception as e:  # one failing config must not sink the suite
                            rows.append(dict(op=op, residual=residual, mode=mode, hidden=n, impl=name,
                                             error=f"{type(e).__name__}: {e}"[:200]))
                        torch.cuda.empty_cache()
                    if "kernels" in res:
                        for r_ in rows[-len(impls):]:
                            if r_["impl"] == "kernels":
                                r_["x_torch"] = res["kernels"] / res["torch"] if "torch" in res else None
                                r_["x_compile"] = (res["kernels"] / res["torch.compile"]
                                                   if "torch.compile" in res else None)
    save_rows(outdir, "norm", rows)
    for op in ("layer", "rms"):
        sub = [dict(r, series=f"{r['impl']} {r['mode']}{' +res' if r['residual'] else ''}") for r in rows
               if r["op"] == op and "gbs" in r]
        if sub:
            plot_lines(outdir, f"norm_{op}", sub, "hidden", "gbs", "series", f"{op} norm bf16, GB/s (peak {peak:.0f})")
    ours = [r for r in rows if r["impl"] == "kernels"]
    return (f"## norms (bf16, rows*hidden = {ELEMS // 2 ** 20}M)\n\nd2d copy peak: {peak:.0f} GB/s. "
            "x_torch / x_compile: our GB/s over torch eager / torch.compile.\n\n"
            + md_table(ours, ["op", "residual", "mode", "hidden", "ms", "gbs", "pct_peak", "x_torch", "x_compile",
                              "error"]))
