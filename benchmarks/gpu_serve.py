"""Online serving on the GPU: `gpt-engine serve` with a ~125M GPT-2 (random init, bf16) under
Poisson load from `gpt-engine bench serve` (benchmarks/serve.py starts the server), at a few
request rates. Reports request and token throughput, TTFT and inter-token latency p50/p99.

The GPU image lacks the server's dependencies: benchmarks/gpu_run.sh installs the wheels
carried in .whl/ (fastapi, uvicorn, pydantic, ...) before the suite runs.

    python -m benchmarks.gpu_suite --only serve
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import md_table, save_rows

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 256, 128, 128
RATES = ["16", "64", "inf"]  # req/s; inf sends every request at once


def main(outdir: Path) -> str:
    try:
        import fastapi, uvicorn  # noqa: F401,E401
    except ImportError as e:
        return f"## Serving\n\nskipped: {e} (carry the server's wheels in .whl/, see benchmarks/gpu_run.sh)\n"
    from benchmarks import serve
    rows = []
    for rate in RATES:
        r = serve.main(["gpt2", "--server-args", "--device cuda --dtype bfloat16", "--num-prompts", str(NUM_PROMPTS),
                        "--request-rate", rate, "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
                        "--disable-tqdm"])
        rows.append(dict(request_rate=rate, completed=r["completed"], failed=r["failed"],
                         req_per_s=r["request_throughput"], output_tok_per_s=r["output_throughput"],
                         p50_ttft_ms=r["median_ttft_ms"], p99_ttft_ms=r["p99_ttft_ms"],
                         p50_itl_ms=r["median_itl_ms"], p99_itl_ms=r["p99_itl_ms"],
                         mean_tpot_ms=r["mean_tpot_ms"], p99_e2e_ms=r["p99_e2el_ms"]))
        # the summary only: the per-request lists of 256 streams would be most of the file
        summary = {k: v for k, v in r.items() if not isinstance(v, list)}
        (outdir / f"serve-rate-{rate}.json").write_text(json.dumps(summary, indent=1) + "\n")
    save_rows(outdir, "serve", rows)
    return (f"## Serving (gpt-engine serve, GPT-2 124M random init, bf16, {NUM_PROMPTS} streamed requests, "
            f"{INPUT_LEN} prompt + {OUTPUT_LEN} output tokens, Poisson arrivals)\n\n{md_table(rows, list(rows[0]))}\n")
