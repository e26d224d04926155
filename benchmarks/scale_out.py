"""Scaling out on one machine: `gpt-engine bench serve` at fixed concurrency against one engine, against
--data-parallel-size 2 and against --tensor-parallel-size 2, each server started afresh (benchmarks/serve.py)
on the same random-init model. On CPU the two-process setups take one thread per process; one engine runs
once on one thread and once on all of them, so each is compared with both. Configurations run in turns,
round after round; each one's best round and the ratios of the bests are reported.

    python -m benchmarks.scale_out [--model gpt2-small-ish preset] [--device cpu] [--rounds 2]
Writes benchmarks/results/<device>/scale_out.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks import serve


def configs(device: str, cores: int) -> dict[str, tuple[str, dict]]:
    """name -> (server flags, environment)."""
    if device == "cuda":  # GPUs: one against two
        return {"1 engine": ("", {}), "tp2": ("--tensor-parallel-size 2", {}), "dp2": ("--data-parallel-size 2", {})}
    half = str(max(1, cores // 2))
    return {"1 engine, 1 thread": ("", {"OMP_NUM_THREADS": "1"}),
            "1 engine, all threads": ("", {"OMP_NUM_THREADS": str(cores)}),
            "dp2": ("--data-parallel-size 2", {"OMP_NUM_THREADS": half}),   # per replica
            "tp2": ("--tensor-parallel-size 2", {})}                        # per rank: cores / 2


def run(model: str, device: str, flags: str, env: dict, load: list[str]) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return serve.main([model, "--server-args", f"--device {device} {flags}", *load])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-tiny", help="model directory or random-init preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    load = ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--seed", "0",
            "--disable-tqdm"]
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, (flags, env) in configs(args.device, cores).items():
            res = run(args.model, args.device, flags, env, load)
            keep = {k: res[k] for k in ("completed", "failed", "output_throughput", "request_throughput",
                                        "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms",
                                        "load_average_1m")}
            print(f"round {r + 1}: {name:24s} {keep['output_throughput']:8.1f} tok/s", flush=True)
            if name not in best or keep["output_throughput"] > best[name]["output_throughput"]:
                best[name] = keep
    names = list(best)
    base = [n for n in names if n.startswith("1 engine")]
    ratios = {f"{a} / {b}": round(best[a]["output_throughput"] / best[b]["output_throughput"], 3)
              for a in names if a not in base for b in base}
    result = dict(model=args.model, device=args.device, cpu_count=cores, rounds=args.rounds,
                  load=dict(num_prompts=args.num_prompts, max_concurrency=args.max_concurrency,
                            input_len=args.input_len, output_len=args.output_len),
                  configs={n: configs(args.device, cores)[n][0] or "(one engine)" for n in names},
                  best=best, output_throughput_ratios=ratios)
    print(json.dumps(result, indent=1))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.device / "scale_out.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
