"""Shared helpers for the GPU suite: timing, result files, plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# datasheet peaks (HBM bytes/s, dense bf16 FLOP/s) of the GPUs this project is lent; the SXM parts
# have the same tensor cores, the H200 faster memory
_SPECS = {"h200": (4.8e12, 989e12), "h100": (3.35e12, 989e12)}


def device_peaks(name: str | None = None) -> tuple[float, float, str]:
    """(HBM bytes/s, dense bf16 FLOP/s, label) of the current CUDA device by its name; an unknown
    GPU gets the H100's numbers, and the label says so."""
    if name is None:
        import torch
        name = torch.cuda.get_device_name()
    for key, (bw, flops) in _SPECS.items():
        if key in name.lower():
            return bw, flops, key.upper()
    return *_SPECS["h100"], f"H100 figures (unknown GPU {name!r})"


def bench_ms(fn, warmup=25, rep=100):
    """Median milliseconds of fn() on the GPU (CUDA events, L2 flushed between runs)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def save_rows(outdir: Path, name: str, rows: list[dict]) -> None:
    """Write rows as outdir/name.json and outdir/name.csv."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(outdir / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def plot_lines(outdir: Path, name: str, rows: list[dict], x: str, y: str, series: str, title: str,
               logx: bool = True) -> None:
    """One line per distinct value of rows[series]: y against x, saved as outdir/name.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == s and r.get(y) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=str(s))
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / f"{name}.png", dpi=110)
    plt.close(fig)


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
