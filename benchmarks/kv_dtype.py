"""Accuracy and CPU decode speed of the KV-cache storage formats (kv_cache_dtype auto = fp32, bfloat16, int8).

Accuracy, on a trained model (`make run`'s, runs/tiny, written by `gpt-engine train`):
- validation loss through the cache: the prompt logprobs of fixed windows of the model's validation split,
  prefilled in chunks of --chunk tokens, so every chunk after the first attends to keys and values read
  back from the stored (rounded or quantised) cache; relative to the fp32 cache;
- greedy agreement with the fp32 cache over a batch of prompts (every decode step reads the cache): the
  share of prompts whose whole continuation matches, and the share of tokens before the first difference.

Speed, on a random-init model of the same shape with room for 2k-token contexts: decode tokens/s for one
stream and for 16 streams at ~2k-token contexts, each format against the fp32 cache in alternating turns
over several rounds (the median ratio counts; the machine may be shared). A run's decode speed is the
streams over its median decode step time (the engine stepped by hand; the median shrugs off another
process's bursts); the prefix cache holds the prompts after the warm-up, so each run's first step
computes only their last block.
Writes benchmarks/results/cpu/kv_dtype.json.

  python -m benchmarks.kv_dtype [--model runs/tiny] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .quant_accuracy import greedy_agreement, val_prompts

FORMATS = ("auto", "bfloat16", "int8")


def val_loss(llm, tokens: np.ndarray, seq_len: int, n_windows: int) -> float:
    """Mean next-token cross-entropy over n_windows evenly spaced windows of seq_len tokens, from the
    engine's prompt logprobs (the chunked prefill reads the cache)."""
    from gpt_engine import SamplingParams
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    prompts = [[int(t) for t in tokens[s:s + seq_len]] for s in starts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    lps = [lp[t] for p, o in zip(prompts, outs) for t, lp in zip(p[1:], o.prompt_logprobs[1:])]
    return -sum(lps) / len(lps)


def accuracy(args) -> dict:
    from gpt_engine import LLM, SamplingParams
    path = Path(args.model)
    tokens, prompts = val_prompts(path, args.prompts, args.prompt_len)
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    res, base = {}, None
    for fmt in FORMATS:
        llm = LLM(str(path), device="cpu", kv_cache_dtype=fmt, max_num_batched_tokens=args.chunk,
                  enable_prefix_caching=False)
        loss = val_loss(llm, tokens, args.seq_len, args.windows)
        outs = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        r = dict(val_loss=loss, kv_bytes_per_token=llm.runner.block_bytes() / llm.runner.block_size)
        if base is None:
            base = dict(loss=loss, outs=outs)
        else:
            r.update(val_loss_rel_to_fp32=loss / base["loss"] - 1, **greedy_agreement(outs, base["outs"]))
        res[fmt] = r
        print(fmt, json.dumps(r), flush=True)
        del llm
    return res


def speed(args) -> dict:
    """Decode tokens/s per format and stream count, in alternating turns, and the median ratio to fp32."""
    from gpt_engine import LLM, SamplingParams
    from gpt_engine.models.gpt import GPT
    from gpt_engine.models.presets import resolve_config
    tokens_per_seq = args.context + args.new_tokens + 16
    # the trained model's shape, random init (the same weights for each format), room for the contexts
    cfg = resolve_config(str(Path(args.model) / "config.json"), max_seq_len=tokens_per_seq)
    llms = {}
    for fmt in FORMATS:
        torch.manual_seed(0)
        # room for twice the streams: the prompts' cached blocks are never evicted for a run's new ones
        llms[fmt] = LLM(GPT(cfg).eval(), device="cpu", kv_cache_dtype=fmt, max_num_seqs=16,
                        kv_cache_tokens=32 * tokens_per_seq)
    g = torch.Generator().manual_seed(0)
    out = {}
    for streams in (1, 16):
        prompts = [torch.randint(1, cfg.vocab_size, (args.context,), generator=g).tolist() for _ in range(streams)]

        def run(llm, n):
            """-> decode tokens/s: the streams over the median time of the run's last n - 1 (decode) steps."""
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            for p in prompts:
                llm.add_request(llm.prepare(p, sp))
            times = []
            while llm.has_unfinished():
                t = time.perf_counter()
                llm.step()
                times.append(time.perf_counter() - t)
            return streams / statistics.median(times[-(n - 1):])
        for llm in llms.values():
            run(llm, 3)  # warm-up: the prompts into the prefix cache
        tps = {fmt: [] for fmt in FORMATS}
        for _ in range(args.rounds):
            for fmt, llm in llms.items():
                tps[fmt].append(run(llm, args.new_tokens))
        out[f"streams_{streams}"] = {
            fmt: dict(decode_tokens_per_s=statistics.median(v), rounds=v,
                      ratio_to_fp32=statistics.median(a / b for a, b in zip(v, tps["auto"])))
            for fmt, v in tps.items()}
        print(streams, "streams", json.dumps({f: round(r["ratio_to_fp32"], 3)
                                               for f, r in out[f"streams_{streams}"].items()}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny")
    ap.add_argument("--seq-len", type=int, default=255, help="window tokens (+1 generated: the context)")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--chunk", type=int, default=32, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu" / "kv_dtype.json"))
    args = ap.parse_args()
    acc = accuracy(args)
    spd = speed(args)
    doc = dict(model=args.model, seq_len=args.seq_len, windows=args.windows, chunk=args.chunk, prompts=args.prompts,
               prompt_len=args.prompt_len, gen_tokens=args.gen_tokens, accuracy=acc,
               speed=dict(context=args.context, new_tokens=args.new_tokens, rounds=args.rounds, **spd),
               machine=dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                            note="a shared 2-core machine: the ratios (alternating turns, medians) are what count"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
