"""Tensor and data parallelism on GPUs: `gpt-engine bench serve` against one engine, --tensor-parallel-size 2
and --data-parallel-size 2 (benchmarks/scale_out.py) on a ~125M GPT-2 (random init, bf16). Needs two GPUs:
on a one-GPU machine it reports itself skipped.

    python -m benchmarks.gpu_suite --only scale_out
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import md_table, save_rows


def main(outdir: Path) -> str:
    import torch
    if torch.cuda.device_count() < 2:
        return f"## Scaling out\n\nskipped: {torch.cuda.device_count()} GPU(s), two needed\n"
    from benchmarks import scale_out
    r = scale_out.main(["--model", "gpt2", "--device", "cuda", "--rounds", "1", "--num-prompts", "256",
                        "--max-concurrency", "64", "--input-len", "128", "--output-len", "128",
                        "--out", str(outdir / "scale_out.json")])
    rows = [dict(config=name, output_tok_per_s=b["output_throughput"], p50_ttft_ms=b["median_ttft_ms"],
                 p50_tpot_ms=b["median_tpot_ms"]) for name, b in r["best"].items()]
    save_rows(outdir, "scale_out", rows)
    return f"## Scaling out (GPT-2 124M, bf16, 256 requests at concurrency 64)\n\n{md_table(rows, list(rows[0]))}\n"
