"""Sliding-window attention on CPU: time against sequence length at a fixed window, and full causal.

A windowed layer (mistral, gpt_neo's local layers) should cost O(S x W), not O(S^2): its time
per token flat in S, where full causal's grows with S. Two CPU paths of gpt_engine.kernels, float32,
no grad, in one run:
- prefill: flash_attention_varlen (csrc/varlen_cpu.cpp), one sequence of S tokens, causal,
  window_size=(W - 1, 0) vs (-1, -1);
- decode: paged_attention (csrc/paged_cpu.cpp), B sequences with S cached tokens each, one new
  token, the same two windows.
Writes benchmarks/results/cpu/window_scaling.{csv,json,png}; the ratio column is full causal's
time over the window's at the same S.

    python benchmarks/window_scaling.py [--window 256] [--max-s 8192]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "cpu"
H, HKV, D = 8, 2, 64  # GQA 4, a llama-like head
DECODE_BATCH, BLOCK = 8, 16


def _median_ms(fn, min_reps=3, budget_s=1.5):
    fn()  # warm-up: scratch buffers, the thread pool
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def prefill_ms(s, window):
    import torch
    from gpt_engine import kernels
    q, k, v = torch.randn(s, H, D), torch.randn(s, HKV, D), torch.randn(s, HKV, D)
    cu = torch.tensor([0, s], dtype=torch.int32)
    with torch.no_grad():
        return _median_ms(lambda: kernels.flash_attention_varlen(q, k, v, cu, cu, s, s, causal=True,
                                                                 window_size=window))


def decode_ms(s, window):
    import torch
    from gpt_engine import kernels
    nblk = -(-s // BLOCK)
    kc = torch.randn(DECODE_BATCH * nblk, BLOCK, HKV, D)
    vc = torch.randn_like(kc)
    table = torch.randperm(DECODE_BATCH * nblk, dtype=torch.int32).view(DECODE_BATCH, nblk)
    lens = torch.full((DECODE_BATCH,), s, dtype=torch.int32)
    q = torch.randn(DECODE_BATCH, H, D)
    with torch.no_grad():
        return _median_ms(lambda: kernels.paged_attention(q, kc, vc, table, lens, window_size=window))


def plot(rows, w, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, op in zip(axes, ("prefill", "decode")):
        for name, style in (("causal", "o-"), ("window", "s-")):
            sel = [r for r in rows if r["op"] == op and r["attention"] == name]
            ax.plot([r["S"] for r in sel], [r["ms"] for r in sel], style,
                    label=f"window W={w}" if name == "window" else "full causal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("S (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"{op}: " + ("flash_attention_varlen, 1 sequence" if op == "prefill"
                                  else f"paged_attention, B={DECODE_BATCH}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"CPU float32, H={H}, Hkv={HKV}, D={D}: time vs S (window linear, causal quadratic in prefill)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=256, help="W: keys each token sees, itself included")
    p.add_argument("--min-s", type=int, default=512)
    p.add_argument("--max-s", type=int, default=8192)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this times the C++ CPU kernels, not the Triton interpreter")
    import torch
    from gpt_engine.kernels._ext import ext
    if ext() is None:
        raise SystemExit("gpt_engine.kernels._C is not built: the CPU kernels are what this measures")
    torch.manual_seed(0)
    w = args.window
    seqs, s = [], args.min_s
    while s <= args.max_s:
        seqs.append(s)
        s *= 2
    rows = []
    for op, fn in (("prefill", prefill_ms), ("decode", decode_ms)):
        for s in seqs:
            full = fn(s, (-1, -1))
            win = fn(s, (w - 1, 0))
            tokens = s if op == "prefill" else DECODE_BATCH
            for name, ms in (("causal", full), ("window", win)):
                rows.append(dict(op=op, attention=name, W=w if name == "window" else None, S=s, ms=round(ms, 4),
                                 us_per_token=round(1e3 * ms / tokens, 4),
                                 causal_over_window=round(full / win, 3) if name == "window" else None))
            print(f"{op:8s} S={s:5d}  causal {full:9.3f} ms  window {win:8.3f} ms  ratio {full / win:6.2f}x",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, H=H, Hkv=HKV, D=D, window=w, decode_batch=DECODE_BATCH, block=BLOCK)
    (args.out / "window_scaling.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with open(args.out / "window_scaling.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    plot(rows, w, args.out / "window_scaling.png")
    print(f"wrote {args.out}/window_scaling.{{csv,json,png}}")


if __name__ == "__main__":
    main()
