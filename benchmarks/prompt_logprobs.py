"""Prompt-logprob throughput (prompt tokens scored per second): the engine's batched prompt logprobs
(SamplingParams(prompt_logprobs=0), what `gpt-engine eval` and the server's echo + logprobs run) against
transformers' forward + log_softmax + gather of the same prompts on the same model, fp32.

The model is a random-init GPT-2 shape (the scoring cost is the model's and its head's over the vocab);
both sides run in turns, round after round, each one's best round counts. transformers gets the
prompts in batches of --hf-batch (equal lengths: no padding). Writes
benchmarks/results/<device>/prompt_logprobs.json.

    python -m benchmarks.prompt_logprobs [--rounds 3] [--num-prompts 8] [--prompt-len 512] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHAPE = dict(n_layer=6, n_embd=512, n_head=8, vocab_size=32000, n_positions=1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--hf-batch", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/prompt_logprobs.json)")
    args = p.parse_args()

    import torch
    import transformers

    from gpt_engine import SamplingParams
    from gpt_engine.llm import LLM

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval().to(args.device)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, SHAPE["vocab_size"], (args.num_prompts, args.prompt_len), generator=g)
    scored = args.num_prompts * (args.prompt_len - 1)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        llm = LLM(tmp, device=args.device, dtype="float32")
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        ids = prompts.tolist()

        def ours():
            outs = llm.generate(ids, params, use_tqdm=False)
            return [sum(d[t] for d, t in zip(o.prompt_logprobs[1:], p[1:])) for o, p in zip(outs, ids)]

        @torch.no_grad()
        def theirs():
            res = []
            for a in range(0, len(prompts), args.hf_batch):
                x = prompts[a:a + args.hf_batch].to(args.device)
                lp = hf(x).logits.float().log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
                res += lp.double().sum(-1).tolist()
            return res

        ours(), theirs()  # warm-up
        best = {"ours": float("inf"), "transformers": float("inf")}
        for r in range(args.rounds):
            for name, fn in (("ours", ours), ("transformers", theirs)):
                t = time.perf_counter()
                vals = fn()
                best[name] = min(best[name], time.perf_counter() - t)
                print(f"round {r + 1}: {name:12s} {scored / (time.perf_counter() - t):9.1f} prompt tok/s", flush=True)
                if name == "ours":
                    mine = vals
                else:
                    diff = max(abs(a - b) for a, b in zip(mine, vals))
    rate = {k: scored / v for k, v in best.items()}
    result = dict(shape=SHAPE, device=args.device, threads=torch.get_num_threads(), num_prompts=args.num_prompts,
                  prompt_len=args.prompt_len, hf_batch=args.hf_batch, rounds=args.rounds, scored_tokens=scored,
                  ours_tok_per_s=round(rate["ours"], 1), transformers_tok_per_s=round(rate["transformers"], 1),
                  ratio=round(rate["ours"] / rate["transformers"], 3), max_abs_diff_summed_logprob=diff,
                  torch=torch.__version__, transformers=transformers.__version__)
    print(json.dumps(result, indent=1))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.device / "prompt_logprobs.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
