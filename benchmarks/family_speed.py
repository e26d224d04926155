"""Serving speed of each model family against a llama of the same size, as `gpt-engine bench` measures it
(offline greedy throughput of the engine, CPU float32 by default: the packed GEMMs and the fused decode layer).

Every model has the same shape (8 layers, d_model 512, 8 heads of 64 with as many KV heads, vocab 8192,
each MLP at its family's default width: the same parameters for a plain and a gated MLP), so a family
differs from the llama only in its traits: partial or interleaved rotary, parallel residual, q/k norms,
(1 + w) norms, GeGLU, an embedding scale, biases. The models run in turns, round after round; each one's
best round counts. Writes benchmarks/results/<device>/family_speed.json.

    python -m benchmarks.family_speed [--rounds 3] [--num-prompts 16] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SHAPE = dict(n_layer=8, d_model=512, n_head=8, n_kv_head=8, max_seq_len=512, vocab_size=8192)
# each family with the traits its checkpoints have (GPT-NeoX and GPT-J rotate a quarter of each head)
FAMILIES = {"llama": {}, "gpt_neox": dict(rotary_fraction=0.25), "gptj": dict(rotary_fraction=0.25),
            "phi3": {}, "gemma": {}, "qwen3": {}, "gpt2": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/family_speed.json)")
    args = p.parse_args()

    import torch

    from gpt_engine import ModelConfig
    from gpt_engine.cli.bench import run_bench
    from gpt_engine.models.gpt import GPT
    from gpt_engine.models.save import save_model

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, traits in FAMILIES.items():
            torch.manual_seed(0)
            cfg = ModelConfig(model_type=name, tie_embeddings=name != "gptj", **SHAPE, **traits)
            dirs[name] = f"{tmp}/{name}"
            save_model(GPT(cfg), dirs[name])
        for r in range(args.rounds):
            for name, d in dirs.items():
                res = run_bench(d, num_prompts=args.num_prompts, input_len=(8, 128), output_len=(64, 64),
                                device=args.device, hf=False, repeat=1)
                best[name] = max(best.get(name, 0.0), res["ours"]["output_tok_per_s"])
                print(f"round {r + 1}: {name:9s} {res['ours']['output_tok_per_s']:8.1f} output tok/s", flush=True)
    rows = [dict(family=n, output_tok_per_s=round(v, 1), ratio_to_llama=round(v / best["llama"], 3))
            for n, v in best.items()]
    for row in rows:
        print(f"{row['family']:9s} {row['output_tok_per_s']:8.1f} output tok/s  {row['ratio_to_llama']:.3f}x llama")
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.device / "family_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(shape=SHAPE, traits=FAMILIES, rounds=args.rounds, num_prompts=args.num_prompts,
                                   workload="input 8..128, output 64, greedy", rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
