"""LoRA serving's cost: tokens/s of a batch whose streams are spread over 4 adapters (each stream's own, all
in the same steps) against the same streams on the base model alone, on one engine, in one run.

The model is a random-init GPT-2 shape (6 layers of 512); the adapters are PEFT LoRA adapters (rank --rank on c_attn,
c_proj and c_fc, lora_B random) written with peft. Both sides decode the same prompts for the same number of
tokens (ignore_eos), in turns, round after round: each one's best round, and the median of the rounds'
paired ratios (a shared machine's load moves between rounds). On CPU the same rounds run again on one
thread, timed by the thread's CPU time: a ratio that other jobs on a shared machine do not move (they take
turns on the cores, which hurts a step of many small ops more than the base model's fused decode layer).
Writes benchmarks/results/<device>/lora_serve.json.

    python -m benchmarks.lora_serve [--streams 16] [--prompt-len 64] [--max-tokens 64] [--rounds 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SHAPE = dict(n_layer=6, n_embd=512, n_head=8, vocab_size=32000, n_positions=1024)
ADAPTERS = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/lora_serve.json)")
    args = p.parse_args()

    import peft
    import torch
    import transformers

    from gpt_engine import LLM, LoRARequest, SamplingParams

    load_at_start = round(os.getloadavg()[0], 2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (args.prompt_len,), generator=g).tolist()
               for _ in range(args.streams)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(f"{tmp}/base")
        loras = []
        for i in range(ADAPTERS):
            pm = peft.get_peft_model(hf, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, fan_in_fan_out=True,
                                                         target_modules=["c_attn", "c_proj", "c_fc"]))
            with torch.no_grad():
                for n, w in pm.named_parameters():
                    if "lora_B" in n:
                        w.normal_(0, 0.02)
            pm.save_pretrained(f"{tmp}/a{i}")
            hf = pm.unload()  # the base model back, for the next adapter
            loras.append(LoRARequest(f"a{i}", i + 1, f"{tmp}/a{i}"))
        llm = LLM(f"{tmp}/base", device=args.device, dtype="float32", enable_lora=True, max_loras=ADAPTERS,
                  max_lora_rank=args.rank, enable_prefix_caching=False)
        mixed = [loras[i % ADAPTERS] for i in range(args.streams)]

        def rounds(clock, label):
            def run(lora):
                t = clock()
                outs = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
                return sum(len(o.token_ids) for o in outs) / (clock() - t)

            run(None), run(mixed)  # warm-up (and the adapters' first load)
            best, rates = {"base": 0.0, "lora": 0.0}, {"base": [], "lora": []}
            for r in range(args.rounds):
                for name, lora in (("base", None), ("lora", mixed)):
                    rate = run(lora)
                    best[name] = max(best[name], rate)
                    rates[name].append(rate)
                    print(f"{label} round {r + 1}: {name:4s} {rate:8.1f} tok/s", flush=True)
            return best, [a / b for a, b in zip(rates["lora"], rates["base"])]

        threads = torch.get_num_threads()
        best, pairs = rounds(time.perf_counter, "wall")
        cpu = None
        if args.device == "cpu":
            torch.set_num_threads(1)
            cpu_best, cpu_pairs = rounds(time.thread_time, "1-thread cpu time")
            cpu = dict(base_tok_per_cpu_s=round(cpu_best["base"], 1), lora_tok_per_cpu_s=round(cpu_best["lora"], 1),
                       ratio=round(cpu_best["lora"] / cpu_best["base"], 3),
                       median_round_ratio=round(statistics.median(cpu_pairs), 3))
    result = dict(shape=SHAPE, device=args.device, threads=threads, streams=args.streams,
                  adapters=ADAPTERS, rank=args.rank, targets=["c_attn", "c_proj", "c_fc"],
                  prompt_len=args.prompt_len, max_tokens=args.max_tokens, rounds=args.rounds,
                  base_tok_per_s=round(best["base"], 1), lora_tok_per_s=round(best["lora"], 1),
                  ratio=round(best["lora"] / best["base"], 3), median_round_ratio=round(statistics.median(pairs), 3),
                  round_ratios=[round(x, 3) for x in pairs], one_thread_cpu_time=cpu,
                  load_avg_1m=[load_at_start, round(os.getloadavg()[0], 2)],
                  note="the 1-minute load average before and after is in load_avg_1m (this machine is shared)",
                  torch=torch.__version__, peft=peft.__version__)
    print(json.dumps(result, indent=1))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.device / "lora_serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
