"""Where a batched CPU decode step's time goes: GPT-2 124M shape (random init), B streams of 128-token
prompts, greedy, 2 threads, per weight format and KV cache dtype.

For each case the engine decodes (`LLM.step()`, scheduling and sampling included) and, at the same
point of the same run, each part of its step is timed alone on the engine's own tensors: the four
layer GEMMs of every layer on its packed weights (n_layer distinct weights, so they come from memory
as in the step), decode attention over every layer's cache with the running sequences' block tables,
the LM head, and the sampler. "rest" is the step less those parts: norms, cache writes, the residual
and activation passes, the layer's kernel calls and the Python step. With --perf (Linux perf on the
PATH) the decode loop is also sampled and the top symbols kept. Writes
benchmarks/results/cpu/decode_profile.json and .png.

    python -m benchmarks.decode_profile [--streams 16] [--formats w8a8,bf16,int8,fp32] [--perf]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .llamacpp import OURS, cpu_name, write_model

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
PROMPT, GEN = 128, 32


def _median_ms(fn, repeats: int = 15) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _perf_top(seconds: float, n: int = 12) -> list[str] | None:
    """The top symbols of this process over seconds (perf record, then report), or None without perf."""
    if shutil.which("perf") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/perf.data"
        r = subprocess.run(["perf", "record", "-F", "999", "-p", str(os.getpid()), "-o", data, "--", "sleep",
                            str(seconds)], capture_output=True)
        if r.returncode:
            return None
        out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol", "-g", "none"],
                             capture_output=True, text=True).stdout
    rows = [" ".join(line.split()) for line in out.splitlines() if "%" in line and not line.startswith("#")]
    return [r.replace("(anonymous namespace)::", "")[:120] for r in rows[:n]]


def parts(llm, streams: int) -> dict:
    """Each part of a decode step timed alone on the engine's tensors (see the module docstring)."""
    from gpt_engine.kernels import packed_linear, paged_attention
    from gpt_engine.worker.sampler import _argmax
    model, runner = llm.model, llm.runner
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    C, ff = cfg.d_model, model.layers[0].mlp.fc.out_features
    x, h = torch.randn(streams, C, generator=g), torch.randn(streams, ff, generator=g)
    q = torch.randn(streams, cfg.n_head, cfg.head_dim, generator=g)

    def gemms():
        for blk in model.layers:
            a, m = blk.attn, blk.mlp
            packed_linear(x, a.qkv.format.packed, a.qkv.bias)
            packed_linear(x, a.proj.format.packed, a.proj.bias)
            packed_linear(x, m.fc.format.packed, m.fc.bias, m.fc.activation)
            packed_linear(h, m.proj.format.packed, m.proj.bias)

    seqs = list(llm.scheduler.running)[:streams]
    width = max(len(s.block_table) for s in seqs)
    table = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
    lens = torch.tensor([s.num_computed_tokens for s in seqs], dtype=torch.int32)  # the keys the cache holds

    def attention():
        for cache in runner.kv_caches:
            scales = dict(k_scale=cache[2], v_scale=cache[3]) if len(cache) == 4 else {}
            paged_attention(q, cache[0], cache[1], table, lens, cfg.head_dim ** -0.5, **scales)

    logits = model.logits(x)
    with torch.no_grad():
        return dict(gemm=_median_ms(gemms), attention=_median_ms(attention), head=_median_ms(lambda: model.logits(x)),
                    sample=_median_ms(lambda: _argmax(logits)))


def case(model_dir: Path, fmt: str, kv: str, streams: int, perf: bool) -> dict:
    from gpt_engine import LLM, SamplingParams
    llm = LLM(str(model_dir), device="cpu", enable_prefix_caching=False, **{"kv_cache_dtype": kv, **OURS[fmt]})
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=GEN + 1, temperature=0.0, ignore_eos=True)

    def run(profile_parts=False):
        seqs = [llm.add_request(rng.integers(1, 50000, PROMPT).tolist(), sp) for _ in range(streams)]
        while any(s.num_output_tokens == 0 for s in seqs):
            llm.step()
        steps, got = [], None
        while llm.has_unfinished():
            if profile_parts and len(steps) == GEN // 2:  # mid-decode: the caches hold PROMPT + GEN / 2 tokens
                got = parts(llm, streams)
            t = time.perf_counter()
            llm.step()
            steps.append(time.perf_counter() - t)
        return statistics.median(steps) * 1e3, got

    run()  # warm-up
    step_ms = min(run()[0] for _ in range(3))
    _, p = run(profile_parts=True)
    out = dict(step_ms=round(step_ms, 3), tok_per_s=round(streams * 1e3 / step_ms, 1),
               parts_ms={k: round(v, 3) for k, v in p.items()},
               rest_ms=round(step_ms - sum(p.values()), 3))
    if perf:
        top = []
        sampler = threading.Thread(target=lambda: top.append(_perf_top(4.0)))
        sampler.start()
        while sampler.is_alive():
            run()
        out["perf_top"] = top[0]
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["cases"])
    keys = ("gemm", "attention", "head", "sample")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(names))
    for k in (*keys, "rest"):
        vals = np.array([max(0.0, res["cases"][n]["rest_ms"] if k == "rest" else res["cases"][n]["parts_ms"][k])
                         for n in names])
        ax.bar(names, vals, bottom=bottom, label=k)
        bottom += vals
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{res['streams']} streams, GPT-2 124M shape, {res['threads']} threads: a step's parts")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="w8a8,int8,bf16,fp32")
    ap.add_argument("--kv", default="auto,bfloat16,int8", help="KV cache dtypes, each run with every format")
    ap.add_argument("--perf", action="store_true", help="sample the decode loop with Linux perf")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = dict(cpu=cpu_name(), threads=args.threads, streams=args.streams, prompt=PROMPT, gen=GEN,
               load_avg_1m=round(os.getloadavg()[0], 2), cases={})
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), seed=0)
        for fmt in args.formats.split(","):
            for kv in args.kv.split(","):
                name = f"{fmt}, kv {kv}"
                res["cases"][name] = case(Path(tmp), fmt, kv, args.streams, args.perf)
                print(name, json.dumps(res["cases"][name]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_profile.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / "decode_profile.png")


if __name__ == "__main__":
    main()
