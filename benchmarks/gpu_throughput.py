"""Offline generation throughput on the GPU: our LLM vs HF generate, measured in one run.

~125M GPT-2 (preset "gpt2", random init), bf16, 256 prompts of 32-512 random tokens, 64-256
new tokens each, ignore_eos, greedy. HF runs batched and left padded (batches of 64 sorted
by output length, each run to its longest request; only requested tokens count). Also ours
with enforce_eager, to show what CUDA graphs buy. Goal: >= 10x HF output tok/s.

    python -m benchmarks.gpu_suite --only throughput
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import md_table, save_rows

CASES = [
    # name, num_prompts, input_len, output_len, hf
    ("mixed", 256, (32, 512), (64, 256), True),
    ("decode-heavy", 256, (16, 64), (256, 256), False),
]


def main(outdir: Path) -> str:
    import torch

    from gpt_engine.cli.bench import format_result, run_bench
    rows = []
    for name, n, inp, out, hf in CASES:
        for eager in (False, True):
            if eager and name != "mixed":
                continue
            r = run_bench("gpt2", num_prompts=n, input_len=inp, output_len=out, device="cuda",
                          dtype=torch.bfloat16, seed=0, max_num_seqs=256, hf=hf and not eager, hf_batch_size=64,
                          enforce_eager=eager, repeat=2)
            print(format_result(r), flush=True)
            row = dict(case=name, engine="ours-eager" if eager else "ours", num_prompts=n,
                       input_len=f"{inp[0]}-{inp[1]}", output_len=f"{out[0]}-{out[1]}",
                       req_per_s=r["ours"]["requests_per_s"], output_tok_per_s=r["ours"]["output_tok_per_s"],
                       total_tok_per_s=r["ours"]["total_tok_per_s"], cuda_graphs=r["ours"]["cuda_graphs"])
            rows.append(row)
            if "hf" in r:
                rows.append(dict(case=name, engine="hf-generate", num_prompts=n, input_len=row["input_len"],
                                 output_len=row["output_len"], req_per_s=r["hf"]["requests_per_s"],
                                 output_tok_per_s=r["hf"]["output_tok_per_s"],
                                 total_tok_per_s=r["hf"]["total_tok_per_s"]))
                rows[-2]["ratio_vs_hf"] = r["ratio_output_tok_per_s"]
    save_rows(outdir, "throughput", rows)
    cols = ["case", "engine", "num_prompts", "input_len", "output_len", "req_per_s", "output_tok_per_s",
            "total_tok_per_s", "ratio_vs_hf", "cuda_graphs"]
    return ("## Offline generation throughput (GPT-2 124M random init, bf16)\n\n"
            "Ours (LLM.generate, continuous batching, paged KV, CUDA graphs for decode) vs HF "
            "`generate` (batch 64, left padded), same prompts, ignore_eos, greedy. Goal >= 10x.\n\n"
            + md_table(rows, cols) + "\n")
