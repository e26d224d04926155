"""Accuracy and CPU decode speed of the inference weight formats on a trained model.

For fp32, bf16 storage, fp16 storage, int8 per output channel and int8 per group (64, 32), and
w8a8 (int8 weights against activations quantised per 32 values), on the engine's CPU path (GEMMs
packed in each format):
- validation loss over fixed windows of the model's own validation split (runs/tiny/data/val.bin,
  written by `gpt-engine train`), relative to fp32;
- greedy agreement with fp32 over a batch of prompts: the share of prompts whose whole continuation
  matches, and the share of continuation tokens before the first difference;
- single-stream decode tokens/s (one prompt, greedy), the best of a few runs.
Writes benchmarks/results/cpu/quant_accuracy.json.

  .venv/bin/python benchmarks/quant_accuracy.py [--model runs/tiny] [--speed-model gpt2-small]
  .venv/bin/python benchmarks/quant_accuracy.py --memory gpt2-small   (writes quant_memory.json)

--speed-model also times a larger random-init preset, whose weights do not fit in cache (the
regime the formats are for); its losses mean nothing and are not reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FORMATS = {
    "fp32": dict(),
    "bf16": dict(dtype="bfloat16"),
    "fp16": dict(dtype="float16"),
    "int8": dict(quantization="int8"),
    "int8-g64": dict(quantization="int8", quantization_group_size=64),
    "int8-g32": dict(quantization="int8", quantization_group_size=32),
    "w8a8": dict(quantization="w8a8"),
}



def val_prompts(path: Path, n: int, length: int) -> tuple[np.ndarray, list[list[int]]]:
    """The run's validation tokens (its data/val.bin) and n prompts of `length` tokens from them, fixed."""
    tokens = np.memmap(path / "data" / "val.bin", dtype=np.uint16, mode="r")
    starts = np.random.default_rng(0).integers(0, len(tokens) - length, n)
    return tokens, [[int(t) for t in tokens[s:s + length]] for s in starts]


def greedy_agreement(outs: list[list[int]], base: list[list[int]]) -> dict:
    """How far greedy outputs agree with the baseline's: the share of prompts identical, and the share of
    tokens generated before the first difference."""
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, base))
    return dict(greedy_identical=sum(a == b for a, b in zip(outs, base)) / len(outs),
                greedy_tokens_before_first_difference=prefix / sum(map(len, base)))

def val_loss(llm, tokens: np.ndarray, seq_len: int, n_windows: int) -> float:
    """Mean next-token cross-entropy over n_windows evenly spaced windows of seq_len + 1 tokens."""
    model = llm.model
    starts = np.linspace(0, len(tokens) - seq_len - 2, n_windows).astype(np.int64)
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_windows, 8):
            rows = np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + 8]]).astype(np.int64)
            ids = torch.from_numpy(rows)
            logits = model(ids[:, :-1])
            tot += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
            n += ids[:, 1:].numel()
    return tot / n


def decode_speed(llm, prompt, tokens: int, repeats: int) -> float:
    from gpt_engine import SamplingParams
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = llm.generate([prompt], sp)[0]
        best = min(best, (time.perf_counter() - t) / len(out.token_ids))
    return 1.0 / best


MEMORY_FORMATS = ("fp32", "bf16", "int8", "w8a8")


def _child_memory(model_dir: str, fmt: str) -> dict:
    """In a fresh process: load model_dir through LLM in fmt, then its tensors' bytes and the
    process's resident size (current, and the peak of loading)."""
    import resource
    from gpt_engine import LLM

    def rss():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) * 1024
    before = rss()
    llm = LLM(model_dir, device="cpu", kv_cache_tokens=1024, **FORMATS[fmt])  # a small fixed KV cache
    after = rss()
    mem = llm.model.memory_bytes()
    kv = llm.runner.kv.numel() * llm.runner.kv.element_size()
    return dict(tensor_bytes=mem, rss_bytes=after, model_rss_bytes=after - before - kv, kv_cache_bytes=kv,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory(preset: str, out: str) -> None:
    """Resident size of a random-init preset under each weight format, each in a fresh process."""
    import subprocess
    import sys
    import tempfile
    from gpt_engine.models.presets import resolve_config
    from gpt_engine.models.gpt import GPT
    from gpt_engine.models.layers import Linear
    from gpt_engine.models.save import save_model
    torch.manual_seed(0)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        model = GPT(resolve_config(preset))
        gemm_fp32 = sum(m.weight.numel() * 4 for m in model.layers.modules() if isinstance(m, Linear))
        save_model(model, d)
        del model
        for fmt in MEMORY_FORMATS:
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import quant_accuracy as q; print(json.dumps(q._child_memory({d!r}, {fmt!r})))")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "TRITON_INTERPRET": "0"})
            res[fmt] = json.loads(r.stdout.strip().splitlines()[-1])
            print(fmt, json.dumps(res[fmt]))
    base = res["fp32"]
    for fmt in MEMORY_FORMATS:
        r = res[fmt]
        r["gemm_bytes_rel_to_fp32_params"] = r["tensor_bytes"]["gemm"] / gemm_fp32
        r["rss_rel_to_fp32"] = r["rss_bytes"] / base["rss_bytes"]
        r["model_rss_rel_to_fp32"] = r["model_rss_bytes"] / base["model_rss_bytes"]
    doc = dict(preset=preset, gemm_weight_bytes_fp32=gemm_fp32, kv_cache_tokens=1024, formats=res,
               note="tensor_bytes: params (parameters and buffers), packed (CPU GEMM copies), gemm (the layers' "
                    "GEMM weights in every form held); rss_bytes after LLM(...) in a fresh process; "
                    "model_rss_bytes: what LLM(...) added to the resident size, less its KV cache")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speed-model", default=None, help="a preset also timed (random init), e.g. gpt2-small")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu" / "quant_accuracy.json"))
    ap.add_argument("--memory", default=None, metavar="PRESET",
                    help="only measure the resident size of a random-init PRESET (e.g. gpt2-small) per format "
                         "and write benchmarks/results/cpu/quant_memory.json")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    if args.memory:
        return memory(args.memory, str(Path(__file__).resolve().parent / "results" / "cpu" / "quant_memory.json"))
    from gpt_engine import LLM, SamplingParams
    from gpt_engine.kernels._ext import ext

    path = Path(args.model)
    tokens, prompts = val_prompts(path, args.prompts, args.prompt_len)
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    res, base = {}, None
    for name, fmt in FORMATS.items():
        llm = LLM(str(path), device="cpu", **fmt)
        loss = val_loss(llm, tokens, args.seq_len, args.windows)
        outs = [o.token_ids for o in llm.generate(prompts, sp)]
        speed = decode_speed(llm, prompts[0], args.speed_tokens, args.repeats)
        r = dict(val_loss=loss, decode_tokens_per_s=speed,
                 packed_dtype=str(llm.model.layers[0].attn.qkv.format.packed.weight.dtype).removeprefix("torch."))
        if base is None:
            base = dict(loss=loss, outs=outs)
        else:
            r.update(val_loss_rel_to_fp32=loss / base["loss"] - 1, **greedy_agreement(outs, base["outs"]))
        res[name] = r
        print(name, json.dumps(r))
        del llm
    out = dict(model=str(path), seq_len=args.seq_len, windows=args.windows, prompts=args.prompts,
               prompt_len=args.prompt_len, gen_tokens=args.gen_tokens, formats=res,
               machine=dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                            panels=list(ext().linear_panels())))
    if args.speed_model:
        from gpt_engine.models.presets import resolve_config
        from gpt_engine.models.gpt import GPT
        torch.manual_seed(0)
        speed = {}
        for name, fmt in FORMATS.items():
            model = GPT(resolve_config(args.speed_model)).eval()
            llm = LLM(model, device="cpu", max_num_seqs=4, **fmt)
            speed[name] = decode_speed(llm, prompts[0], args.speed_tokens, args.repeats)
            print(args.speed_model, name, f"{speed[name]:.1f} tok/s")
            del llm, model
        out["speed_model"] = dict(preset=args.speed_model, decode_tokens_per_s=speed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
