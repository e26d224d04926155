"""Structured outputs on the GPU (benchmarks/structured.py): 16 streams constrained by a JSON schema against
the same streams unconstrained, and one stream's time to first token with a new schema (compiled on the
spot, beside the forward), a cached one, and none, against the compile's own time. bf16.

    python -m benchmarks.gpu_suite --only structured
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import md_table


def main(outdir: Path) -> str:
    from benchmarks import structured
    r = structured.main(["--device", "cuda", "--dtype", "bfloat16", "--rounds", "3",
                         "--out", str(outdir / "structured.json")])
    t, g, sg = r["ttft_ms"], r["ttft_growth_ms"], r["server_ttft_growth_ms"]
    rows = [dict(streams=r["streams"], unconstrained_tok_per_s=r["unconstrained_tok_per_s"],
                 constrained_tok_per_s=r["constrained_tok_per_s"], ratio=r["ratio"],
                 median_round_ratio=r["median_round_ratio"], ttft_unconstrained_ms=t["unconstrained"],
                 ttft_new_schema_growth_ms=g["schema_compiled"], ttft_cached_growth_ms=g["schema_cached"],
                 server_new_schema_growth_ms=sg["schema_compiled"], server_cached_growth_ms=sg["schema_cached"],
                 compile_ms=t["compile_alone"])]
    return ("## Structured outputs (JSON schema, 4-layer GPT-2 shape, 32k vocab, bf16)\n\n"
            "Goals: ratio >= 0.9; a new schema's TTFT growth below its compile time.\n\n"
            + md_table(rows, list(rows[0])) + "\n")
