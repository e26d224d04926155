"""Attention kernels on the GPU: prefill TFLOP/s against torch SDPA, decode HBM bandwidth.

Prefill: bf16, 16k tokens per batch (B = 16384 / S), S = 512..16k, D = 128 (H = 16) and
D = 64 (H = 32), causal and not; forward and forward+backward. Peers, measured in the same
run: SDPA flash and efficient backends (torch.nn.attention.sdpa_kernel) and naive PyTorch
attention (skipped above 8k). FLOPs = 4 B H S^2 D (halved when causal), fwd+bwd = 3.5x fwd.
Decode: paged_attention over a block-16 cache, H = 32, Hkv = 8, D = 128, bf16; achieved GB/s
(K+V read plus q and out) against the datasheet HBM peak (common.device_peaks) and a
device-to-device copy. The same decode over int8 and fp8 caches (kv_cache_dtype, their row scales
read too) against the bf16 cache's time in the same run.
Sliding window: flash_attention causal with window_size=(W - 1, 0), W = 1024, against full
causal at the same shape, fwd and fwd+bwd, S = 2k..32k at a fixed 32k tokens per batch; a
windowed layer's time per token should stay flat in S (time linear in S), causal's grow with S.

    python -m benchmarks.gpu_suite --only attention
"""
from __future__ import annotations

import math
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, device_peaks, md_table, plot_lines, save_rows

TOKENS = 16384
SEQS = [512, 1024, 2048, 4096, 8192, 16384]
HEADS = {128: 16, 64: 32}
NAIVE_MAX_S = 8192
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
WINDOW = 1024
WINDOW_TOKENS = 32768
WINDOW_SEQS = [2048, 4096, 8192, 16384, 32768]
BATCHES = [1, 8, 32, 128]
KV_CASES = [(1, 16384), (32, 4096), (128, 4096)]  # (B, context) of the KV-format decode rows


def _naive(q, k, v, causal):
    # q/k/v (B, H, S, D): materialized scores, as plain PyTorch would do it
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def f(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return f


def _providers():
    from gpt_engine import kernels
    from torch.nn.attention import SDPBackend
    return {
        "ours": (lambda q, k, v, c: kernels.flash_attention(q, k, v, causal=c), "bshd"),
        "sdpa_flash": (_sdpa(SDPBackend.FLASH_ATTENTION), "bhsd"),
        "sdpa_efficient": (_sdpa(SDPBackend.EFFICIENT_ATTENTION), "bhsd"),
        "naive": (_naive, "bhsd"),
    }


def _time(fn, q, k, v, causal, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():  # no autograd bookkeeping for anyone
                return fn(q, k, v, causal)
        return bench_ms(fwd, warmup=10, rep=40)
    out = fn(q, k, v, causal)
    do = torch.randn_like(out)
    return bench_ms(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do), warmup=10, rep=40)


def prefill_rows() -> list[dict]:
    rows = []
    for d, h in HEADS.items():
        for s in SEQS:
            b = max(1, TOKENS // s)
            base = [torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            for causal in (True, False):
                flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
                for name, (fn, layout) in _providers().items():
                    if name == "naive" and s > NAIVE_MAX_S:
                        continue
                    xs = [(x if layout == "bshd" else x.transpose(1, 2).contiguous()).requires_grad_() for x in base]
                    for mode in ("fwd", "fwd+bwd"):
                        row = dict(provider=name, mode=mode, causal=causal, D=d, H=h, B=b, S=s)
                        try:
                            ms = _time(fn, *xs, causal, mode)
                            row.update(ms=ms, tflops=flops * (1 if mode == "fwd" else 3.5) / ms / 1e9)
                        except torch.OutOfMemoryError:
                            row.update(ms=None, tflops=None, error="OOM")
                        except Exception as e:  # one failing peer must not sink the table
                            traceback.print_exc()
                            row.update(ms=None, tflops=None, error=type(e).__name__)
                        rows.append(row)
                        torch.cuda.empty_cache()
            del base
    return rows


# (B, S, H, D, causal): GPT-2 124M's training shape first, then the short sequences where the
# backward measured slower per FLOP than at S=2048 (session 1: 1.40 ms at S=1024 vs 1.25 at 2048)
BREAKDOWN = [(16, 1024, 12, 64, True), (32, 512, 32, 64, True), (32, 512, 32, 64, False),
             (16, 1024, 32, 64, True), (8, 2048, 32, 64, True), (4, 4096, 16, 128, True)]
_KERNELS = ("_fwd_kernel", "_bwd_pre_kernel", "_dq_kernel", "_dkdv_kernel")


def bwd_breakdown_rows() -> list[dict]:
    """Per-kernel CUDA time of one fwd+bwd and the autotuner's pick for each kernel: where the
    backward's time goes at short sequences, from the one run that measures it."""
    from gpt_engine import kernels
    from gpt_engine.kernels import triton_attention as ta
    from torch.profiler import ProfilerActivity, profile
    rows = []
    for b, s, h, d, causal in BREAKDOWN:
        row = dict(B=b, S=s, H=h, D=d, causal=causal)
        try:
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)

            def step():
                return torch.autograd.grad(kernels.flash_attention(q, k, v, causal=causal), (q, k, v), do)
            for _ in range(5):  # autotuning and warm-up
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            per = {}
            for e in prof.key_averages():
                t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
                name = next((n for n in _KERNELS if n in e.key), "other")
                per[name] = per.get(name, 0.0) + t / 10
            flops = 2 * b * h * s * s * d * (0.5 if causal else 1.0)  # one S x S x D matmul
            for n in _KERNELS:
                row[f"{n.strip('_').replace('_kernel', '')}_us"] = per.get(n)
            row["other_us"] = per.get("other", 0.0)
            row["dq_tflops"] = 3 * flops / per["_dq_kernel"] / 1e6 if per.get("_dq_kernel") else None
            row["dkdv_tflops"] = 4 * flops / per["_dkdv_kernel"] / 1e6 if per.get("_dkdv_kernel") else None
            for n, tuned in (("fwd", ta._fwd_tuned), ("dq", ta._dq_tuned), ("dkdv", ta._dkdv_tuned)):
                c = getattr(tuned, "best_config", None)
                row[f"{n}_cfg"] = (f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                                   if c else None)
        except Exception as e:  # a diagnostic: never the reason the suite fails
            traceback.print_exc()
            row["error"] = type(e).__name__
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def window_rows() -> list[dict]:
    """Sliding-window (W - 1, 0) vs full causal flash_attention, bf16, D = 128, H = 16, Hkv = 4."""
    from gpt_engine import kernels
    h, hkv, d = 16, 4, 128
    rows = []
    for s in WINDOW_SEQS:
        b = max(1, WINDOW_TOKENS // s)
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        for name, window in (("window", (WINDOW - 1, 0)), ("causal", (-1, -1))):
            def fn(q, k, v, causal, window=window):
                return kernels.flash_attention(q, k, v, causal=causal, window_size=window)
            # FLOPs the band holds: each query row sees min(i + 1, W) keys
            keys = s * (s + 1) / 2 if name == "causal" else WINDOW * s - WINDOW * (WINDOW - 1) / 2
            flops = 4 * b * h * keys * d
            for mode in ("fwd", "fwd+bwd"):
                row = dict(provider=name, mode=mode, W=WINDOW if name == "window" else None, B=b, S=s, H=h, D=d)
                try:
                    ms = _time(fn, q, k, v, True, mode)
                    row.update(ms=ms, us_per_token=1e3 * ms / (b * s),
                               tflops=flops * (1 if mode == "fwd" else 3.5) / ms / 1e9)
                except Exception as e:  # one failing case must not sink the table
                    traceback.print_exc()
                    row.update(ms=None, error=type(e).__name__)
                rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def copy_bandwidth() -> float:
    """Practical HBM peak: bytes read + written by a 2 GiB device-to-device copy, per second."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup=5, rep=40)
    return 2 * src.numel() * src.element_size() / ms / 1e-3


def decode_rows(peak_bw: float) -> list[dict]:
    from gpt_engine import kernels
    h, hkv, d, bs = 32, 8, 128, 16
    rows = []
    for b in BATCHES:
        for ctx in CONTEXTS:
            row = dict(B=b, context=ctx)
            try:
                nblk = ctx // bs
                kc = torch.randn(b * nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                table = torch.randperm(b * nblk, device="cuda", dtype=torch.int32).view(b, nblk)
                lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
                q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
                ms = bench_ms(lambda: kernels.paged_attention(q, kc, vc, table, lens), warmup=10, rep=40)
                nbytes = 2 * kc.numel() * kc.element_size() + 2 * q.numel() * q.element_size()
                row.update(us=ms * 1e3, GBps=nbytes / ms / 1e6, pct_peak=100 * nbytes / ms / 1e-3 / peak_bw)
                del kc, vc
            except torch.OutOfMemoryError:
                row.update(error="OOM")
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def kv_format_rows(device="cuda", h=32, hkv=8, d=128, bs=16, cases=KV_CASES, time_ms=None) -> list[dict]:
    """Decode over a bf16, int8 and fp8 (compute capability 8.9+) cache: us, GB/s read (the scales
    counted) and the speedup over the bf16 cache. time_ms(fn) -> ms (default bench_ms)."""
    from gpt_engine import kernels
    from gpt_engine.kernels import reference as R
    time_ms = time_ms or (lambda fn: bench_ms(fn, warmup=10, rep=40))
    fmts = [torch.bfloat16, torch.int8]
    if device != "cuda" or torch.cuda.get_device_capability() >= (8, 9):
        fmts.append(torch.float8_e4m3fn)
    rows = []
    for b, ctx in cases:
        nblk = ctx // bs
        src = [torch.randn(b * nblk, bs, hkv, d, device=device, dtype=torch.bfloat16) for _ in range(2)]
        table = torch.randperm(b * nblk, device=device, dtype=torch.int32).view(b, nblk)
        lens = torch.full((b,), ctx, device=device, dtype=torch.int32)
        q = torch.randn(b, h, d, device=device, dtype=torch.bfloat16)
        base = None
        for fmt in fmts:
            (kc, ks), (vc, vs) = [(x, None) if fmt == torch.bfloat16 else R.quantize_kv(x, fmt) for x in src]
            ms = time_ms(lambda: kernels.paged_attention(q, kc, vc, table, lens, k_scale=ks, v_scale=vs))
            base = base or ms
            nbytes = sum(t.numel() * t.element_size() for t in (kc, vc, ks, vs) if t is not None)
            rows.append(dict(B=b, context=ctx, kv=str(fmt).removeprefix("torch."), us=ms * 1e3,
                             GBps=nbytes / ms / 1e6, vs_bf16=base / ms))
        del src, kc, vc, ks, vs
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _ratio(rows, mode, causal, d, s, peer):
    def get(p):
        return next((r.get("tflops") for r in rows if (r["provider"], r["mode"], r["causal"], r["D"], r["S"])
                     == (p, mode, causal, d, s)), None)
    ours, other = get("ours"), get(peer)
    return f"{ours / other:.2f}x" if ours and other else "n/a"


def main(outdir: Path) -> str:
    rows = prefill_rows()
    save_rows(outdir, "attention_prefill", rows)
    for mode in ("fwd", "fwd+bwd"):
        for d in HEADS:
            sel = [dict(r, series=f"{r['provider']} {'causal' if r['causal'] else 'full'}") for r in rows
                   if r["mode"] == mode and r["D"] == d]
            plot_lines(outdir, f"attention_{mode.replace('+', '_')}_d{d}", sel, "S", "tflops", "series",
                       f"attention {mode}, bf16, D={d}, {TOKENS} tokens")
    brows = bwd_breakdown_rows()
    save_rows(outdir, "attention_bwd_breakdown", brows)
    wrows = window_rows()
    save_rows(outdir, "attention_window", wrows)
    plot_lines(outdir, "attention_window", [dict(r, series=f"{r['provider']} {r['mode']}") for r in wrows], "S",
               "us_per_token", "series", f"sliding window W={WINDOW} vs causal, bf16, D=128 (time per token)")
    peak_bw, _, label = device_peaks()
    peak_copy = copy_bandwidth()
    drows = decode_rows(peak_bw)
    save_rows(outdir, "attention_decode", drows)
    krows = kv_format_rows()
    save_rows(outdir, "attention_decode_kv", krows)
    plot_lines(outdir, "attention_decode", [dict(r, series=f"B={r['B']}") for r in drows], "context", "GBps",
               "series", "paged decode bf16 (H=32, Hkv=8, D=128, block 16)")

    key = ["| D | causal | S | fwd vs sdpa_flash | fwd+bwd vs sdpa_flash | fwd vs efficient |",
           "|---|---|---|---|---|---|"]
    for d in HEADS:
        for causal in (True, False):
            for s in (4096, 16384):
                key.append(f"| {d} | {causal} | {s} | {_ratio(rows, 'fwd', causal, d, s, 'sdpa_flash')} | "
                           f"{_ratio(rows, 'fwd+bwd', causal, d, s, 'sdpa_flash')} | "
                           f"{_ratio(rows, 'fwd', causal, d, s, 'sdpa_efficient')} |")
    best = max((r.get("pct_peak") or 0.0) for r in drows)
    cols = ["provider", "mode", "causal", "D", "S", "B", "ms", "tflops"]
    return "\n\n".join([
        "## attention",
        f"Prefill bf16, {TOKENS} tokens per batch; TFLOP/s with FLOPs = 4·B·H·S²·D (½ causal), "
        "fwd+bwd = 3.5x fwd.",
        "Key ratios (our TFLOP/s / peer's; goal: causal D=128 fwd >= 1.1x sdpa_flash, fwd+bwd >= 1.0x):",
        "\n".join(key),
        md_table(rows, cols),
        "Backward by kernel (us per fwd+bwd, CUDA time; TFLOP/s of the dq and dk/dv passes; autotuned "
        "BLOCK_M x BLOCK_N, warps, stages):",
        md_table(brows, ["B", "S", "H", "D", "causal", "fwd_us", "bwd_pre_us", "dq_us", "dkdv_us", "other_us",
                         "dq_tflops", "dkdv_tflops", "fwd_cfg", "dq_cfg", "dkdv_cfg"]),
        f"Sliding window W={WINDOW} (causal, window_size=(W-1, 0)) vs full causal, {WINDOW_TOKENS} tokens per "
        "batch; goal: the window's us per token flat in S (time linear in S). TFLOP/s over the band's FLOPs:",
        md_table(wrows, ["provider", "mode", "S", "B", "ms", "us_per_token", "tflops"]),
        f"Decode (paged, block 16, H=32, Hkv=8, D=128, bf16). Device copy: {peak_copy / 1e9:.0f} GB/s "
        f"({100 * peak_copy / peak_bw:.0f}% of {label}'s {peak_bw / 1e12:.2f} TB/s). "
        f"Best decode: {best:.0f}% of peak (goal >= 80%).",
        md_table(drows, ["B", "context", "us", "GBps", "pct_peak"]),
        "Decode by KV-cache format (same shape; GB/s of the cache read, scales included; vs_bf16: the bf16 "
        "cache's time / this one's, same run):",
        md_table(krows, ["B", "context", "kv", "us", "GBps", "vs_bf16"]),
    ])
