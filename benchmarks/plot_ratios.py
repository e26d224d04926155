"""One picture per headline claim, redrawn from the committed results.

    python -m benchmarks.plot_ratios          (or: python benchmarks/plot_ratios.py)

Reads benchmarks/results/<device>/*.json and writes to benchmarks/results/:
  ratios.png  ours / peer per component (bar: median over the claim's sizes, whiskers: min..max),
              the goal from DESIGN.md's speed goals as a marker per bar, parity drawn at 1.0
  peak.png    the percent-of-peak claims, the peak drawn at 100% and the goal per bar
  ratios.csv  the plotted numbers and the files they come from
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

try:
    from benchmarks.common import device_peaks
except ModuleNotFoundError:  # run as a file: its own folder is on sys.path instead
    from common import device_peaks

RESULTS = Path(__file__).resolve().parent / "results"
GPU = "nvidia-h100-80gb-hbm3"
CPUS = ("cpu", "cpu-xeon-cascadelake")
SUITE_COLOURS = {"attention": "tab:blue", "norm": "tab:orange", "GEMM": "tab:green",
                 "generation (GPU)": "tab:red", "generation (CPU)": "tab:purple", "training": "tab:brown"}


def load(rel: str):
    return json.loads((RESULTS / rel).read_text())


def bar(chart, suite, component, peer, values, goal, sources):
    return dict(chart=chart, suite=suite, component=component, peer=peer, value=statistics.median(values),
                min=min(values), max=max(values), n=len(values), goal=goal, source=" ".join(sources))


def vs_sdpa(ms, mode, sizes):
    """SDPA flash time / ours, causal D=128, per sequence length."""
    return [ms["sdpa_flash", mode, True, 128, s] / ms["ours", mode, True, 128, s] for s in sizes]


def attention_bars():
    rows = load(f"{GPU}/attention_prefill.json")
    ms = {(r["provider"], r["mode"], r["causal"], r["D"], r["S"]): r["ms"] for r in rows if "ms" in r}
    src = [f"{GPU}/attention_prefill.json"]
    all_s = sorted({r["S"] for r in rows})
    _, flops_peak, _ = device_peaks(GPU)
    long_fwd = [r["tflops"] * 1e12 / flops_peak * 100 for r in rows if r["provider"] == "ours"
                and r["mode"] == "fwd" and r["causal"] and r["D"] == 128 and r["S"] >= 4096]
    return [bar("ratio", "attention", "flash_attention fwd, causal D=128, S 4k-16k", "SDPA flash",
                vs_sdpa(ms, "fwd", [s for s in all_s if s >= 4096]), 1.1, src),
            bar("ratio", "attention", f"flash_attention fwd+bwd, causal D=128, S {all_s[0]}-16k", "SDPA flash",
                vs_sdpa(ms, "fwd+bwd", all_s), 1.0, src),
            # FA3's ~620 TFLOP/s, the design's target, as a share of the same peak
            bar("peak", "attention", f"flash_attention fwd, S 4k-16k\n% of {flops_peak / 1e12:.0f} TFLOP/s bf16 dense",
                "bf16 dense peak", long_fwd, 620e12 / flops_peak * 100, src)]


def norm_bars():
    rows = [r for r in load(f"{GPU}/norm.json") if r["impl"] == "kernels" and "x_torch" in r]
    copy_peak = statistics.median(r["gbs"] / r["pct_peak"] * 100 for r in rows)  # GB/s the % is of
    src = [f"{GPU}/norm.json"]
    out = []
    for mode in ("fwd", "fwd+bwd"):
        mine = [r for r in rows if r["mode"] == mode]
        out.append(bar("ratio", "norm", f"layer/rms_norm {mode}, hidden 768-16k", "torch eager",
                       [r["x_torch"] for r in mine], 1.5, src))
        out.append(bar("peak", "norm", f"layer/rms_norm {mode}\n% of device copy {copy_peak / 1e3:.2f} TB/s",
                       "HBM copy peak", [r["pct_peak"] for r in mine], 85, src))
    return out


def gemm_bars():
    rows = load(f"{GPU}/gemm.json")
    src = [f"{GPU}/gemm.json"]
    return [bar("ratio", "GEMM", "linear bf16", "cuBLAS (torch)",
                [r["x_torch"] for r in rows if r["epilogue"] == "none"], 0.9, src),
            bar("ratio", "GEMM", "linear + bias+GELU fused", "torch two-op",
                [r["x_torch"] for r in rows if r["epilogue"] != "none"], 1.1, src)]


def decode_bars():
    rows = load(f"{GPU}/attention_decode.json")
    hbm = statistics.median(r["GBps"] / r["pct_peak"] * 100 for r in rows)
    # the claim is at scale: small batches are bound by launch latency, not by bandwidth
    at_scale = [r["pct_peak"] for r in rows if r["B"] * r["context"] >= 8 * 16384]
    return [bar("peak", "attention", f"paged decode, B·ctx >= 128k\n% of HBM datasheet {hbm / 1e3:.2f} TB/s",
                "HBM datasheet peak", at_scale, 80, [f"{GPU}/attention_decode.json"])]


def generation_bars():
    rows = {r["engine"]: r for r in load(f"{GPU}/throughput.json") if r["case"] == "mixed"}
    src = [f"{GPU}/throughput.json"]
    hf = rows["hf-generate"]["output_tok_per_s"]
    out = [bar("ratio", "generation (GPU)", f"generate, GPT-2 124M, {label}", "HF generate",
               [rows[engine]["output_tok_per_s"] / hf], 10, src)
           for engine, label in (("ours", "CUDA graphs"), ("ours-eager", "eager"))]
    for name, model in (("throughput.json", "gpt2-tiny"), ("throughput-llama.json", "llama-tiny")):
        files = [f"{d}/{name}" for d in CPUS if (RESULTS / d / name).is_file()]
        out.append(bar("ratio", "generation (CPU)", f"generate, {model}, 2-core CPUs", "HF generate",
                       [load(f)["ratio_output_tok_per_s"] for f in files], 3, files))
    # serve (cpu/serve.json) has no peer measured beside it, so it has no ratio to draw
    return out


def training_bars():
    rows = {r["variant"]: r for r in load(f"{GPU}/train.json")}
    src = [f"{GPU}/train.json"]
    base = rows["baseline nanoGPT + compile"]["tokens_per_s"]
    return [bar("ratio", "training", f"GPT-2 124M training, {v}", "nanoGPT + torch.compile",
                [rows[v]["tokens_per_s"] / base], 1.1, src) for v in ("ours eager", "ours + compile")] + \
           [bar("peak", "training", "GPT-2 124M training, ours eager\nMFU, % of bf16 dense", "bf16 dense peak",
                [rows["ours eager"]["mfu_pct"]], 50, src)]


def draw(bars, png, xlabel, title, base, base_label, unit, log):
    """Horizontal bars from `base` (parity or zero) to each value, whiskers min..max, goal diamonds."""
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(bars) + 1.6))
    y = range(len(bars))[::-1]
    for yi, b in zip(y, bars):
        ax.barh(yi, b["value"] - base, left=base, color=SUITE_COLOURS[b["suite"]], label=b["suite"])
        ax.errorbar(b["value"], yi, xerr=[[b["value"] - b["min"]], [b["max"] - b["value"]]], fmt="none",
                    ecolor="black", capsize=3, lw=1)
    ax.scatter([b["goal"] for b in bars], list(y), marker="D", s=36, color="black", zorder=3,
               label="goal (DESIGN.md)")
    ax.axvline(base if log else 100, color="tab:gray", ls="--", lw=1.2, label=base_label)
    fmt = ".2f" if log else ".0f"
    ax.set_yticks(list(y), [b["component"] + (f"\nvs {b['peer']}: " if log else "\n") +
                            f"{b['value']:{fmt}}{unit}  (goal >= {b['goal']:{'g' if log else '.0f'}}{unit})" for b in bars], fontsize=8)
    right = max(max(b["max"], b["goal"]) for b in bars)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(b["min"] for b in bars) / 1.4, right * 1.8)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    else:
        ax.set_xlim(0, 112)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3, which="both")
    unique = dict(zip(*ax.get_legend_handles_labels()[::-1]))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    bars = attention_bars() + decode_bars() + norm_bars() + gemm_bars() + generation_bars() + training_bars()
    ratios = [b for b in bars if b["chart"] == "ratio"]
    peaks = [b for b in bars if b["chart"] == "peak"]
    draw(ratios, RESULTS / "ratios.png", "ours / peer, speed ratio (log scale; right of 1x: ours is faster)",
         "Ours / peer per component: GPU rows on an H100 80GB HBM3\n(bar: median over the sizes, whiskers: min-max)",
         1.0, "parity (1x)", "x", log=True)
    draw(peaks, RESULTS / "peak.png", "achieved, % of the peak named on each bar",
         "Percent of hardware peak, H100 80GB HBM3\n(bar: median over the sizes, whiskers: min-max)",
         0.0, "peak (100%)", "%", log=False)
    with open(RESULTS / "ratios.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["chart", "suite", "component", "peer", "value", "min", "max", "n", "goal",
                                          "source"], lineterminator="\n")
        w.writeheader()
        for b in bars:
            w.writerow({**b, "component": b["component"].replace("\n", ", "),
                        **{k: f"{b[k]:.4g}" for k in ("value", "min", "max", "goal")}})
    print(f"wrote {RESULTS / 'ratios.png'}, {RESULTS / 'peak.png'}, {RESULTS / 'ratios.csv'}")


if __name__ == "__main__":
    main()
