"""CPU decode side by side with llama.cpp on one random GPT-2 124M-shaped model.

llama.cpp's tools (llama-bench, llama-batched-bench) are built once, from the llama.cpp sources
vendored in the llama-cpp-python sdist, into a cache directory (~/.cache/gpt-engine by default).
The model is a random-init GPT-2 124M saved by gpt-engine in transformers' layout and converted by
llama.cpp's own convert_hf_to_gguf.py to f32, f16 and q8_0. The tokenizer is a byte-level BPE
with GPT-2's pre-tokenizer; the converter identifies pre-tokenizers by hashing a known vocabulary's
output, so for ours it is told "gpt-2" directly (token ids are random here; text never matters).

Each case runs both engines in alternating turns (repeats rounds): each one's best, and the median of
the rounds' paired ratios (a shared machine's load moves between rounds):
- prefill: one 128-token prompt (llama-bench pp128);
- decode x1: one stream, --gen new tokens after a 128-token prompt (llama-bench tg at depth 128);
- decode x16: 16 streams, --gen new tokens each after 128-token prompts (llama-batched-bench S_TG).
Pairs: ours fp32 vs f32, bf16 (with an fp32 and with a bf16 KV cache) vs f16, int8 and w8a8 vs q8_0;
llama.cpp keeps its default f16 KV cache. Also the weight bytes a decode step reads
and the machine's measured read bandwidth. --kv-context N adds the KV cache formats at N-token
contexts (a GPT-2 124M shape with N + --gen positions): ours w8a8 with an int8 cache against q8_0 with
llama.cpp's q8_0 cache (-ctk q8_0 -ctv q8_0), decode at 1 and --batch streams. Writes benchmarks/results/cpu/llamacpp.json and .png.

  python -m benchmarks.llamacpp [--threads 2] [--repeats 3] [--gen 32] [--kv-context 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
TOOLS = ("llama-bench", "llama-batched-bench")
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("bf16+bf16kv", "f16"), ("int8", "q8_0"), ("w8a8", "q8_0"))
# ours' formats; +bf16kv: a bfloat16 KV cache, the 16-bit cache that llama.cpp keeps by default (f16)
OURS = {"fp32": dict(), "bf16": dict(dtype="bfloat16"), "bf16+bf16kv": dict(dtype="bfloat16", kv_cache_dtype="bfloat16"),
        "int8": dict(quantization="int8"), "w8a8": dict(quantization="w8a8")}
RESULTS = Path(__file__).resolve().parent / "results" / "cpu"


def run(cmd, **kw) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def llama_cpp(cache: Path) -> Path:
    """The llama.cpp source tree with TOOLS built under build/bin, built on first use."""
    src = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    bins = src / "build" / "bin"
    if all((bins / t).exists() for t in TOOLS):
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        print("downloading the llama-cpp-python sdist ...", flush=True)
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
             "--no-binary", ":all:", "-d", str(cache)])
    if not src.exists():
        with tarfile.open(sdist) as t:
            t.extractall(cache, filter="data")
        (cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}").rename(src.parents[1])
    print("building llama.cpp's tools (several minutes) ...", flush=True)
    run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"])
    run(["cmake", "--build", str(src / "build"), "-j", str(os.cpu_count() or 2), "--target", *TOOLS])
    return src


def write_model(path: Path, seed: int, positions: int = 1024) -> None:
    """A random-init GPT-2 124M (positions positions) in transformers' layout, with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from gpt_engine.models.presets import resolve_config
    from gpt_engine.models.gpt import GPT
    from gpt_engine.models.save import save_model
    torch.manual_seed(seed)
    save_model(GPT(resolve_config("gpt2", max_seq_len=positions)), path)
    vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    merges = [("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n")]  # llama.cpp refuses a BPE without merges
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))


def convert(src: Path, model: Path, outtype: str) -> Path:
    out = model / f"model-{outtype}.gguf"
    if not out.exists():
        code = ("import sys, convert_hf_to_gguf as c, conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'; "
                "sys.argv = ['convert_hf_to_gguf.py', *sys.argv[1:]]; c.main()")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")])}
        run([sys.executable, "-c", code, str(model), "--outtype", outtype, "--outfile", str(out)], env=env)
    return out


def llama_bench(src: Path, gguf: Path, threads: int, plen: int, gen: int, kv: str = "f16") -> tuple[float, float]:
    """(pp tokens/s of a plen prompt, tg tokens/s of gen tokens at depth plen), one run each; kv: the cache type."""
    cmd = [str(src / "build/bin/llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
           "-ctk", kv, "-ctv", kv]
    pp = json.loads(run([*cmd, "-p", str(plen), "-n", "0"]))[0]["avg_ts"]
    tg = json.loads(run([*cmd, "-p", "0", "-n", str(gen), "-d", str(plen)]))[0]["avg_ts"]
    return pp, tg


def llama_batched(src: Path, gguf: Path, threads: int, plen: int, gen: int, batch: int, kv: str = "f16") -> float:
    """Decode tokens/s summed over batch streams of gen tokens after plen-token prompts; kv: the cache type."""
    out = run([str(src / "build/bin/llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
               "-c", str(batch * (plen + gen) + 16), "-b", "2048", "-ub", "512", "-npp", str(plen), "-ntg", str(gen),
               "-npl", str(batch), "-ctk", kv, "-ctv", kv, "--output-format", "jsonl"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows[-1]["speed_tg"]


def ours_engine(model: Path, fmt: str, threads: int, kv: str = "auto", tokens: int | None = None):
    """tokens: a KV pool of at least that many tokens (every stream of a case at once), else the default's."""
    from gpt_engine import LLM
    torch.set_num_threads(threads)
    return LLM(str(model), device="cpu", enable_prefix_caching=False, kv_cache_tokens=tokens,
               **{"kv_cache_dtype": kv, **OURS[fmt]})


def ours_run(llm, plen: int, gen: int, batch: int, rng) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s summed over the streams) of batch plen-token prompts."""
    from gpt_engine import SamplingParams
    sp = SamplingParams(max_tokens=gen + 1, temperature=0.0, ignore_eos=True)  # +1: prefill's token
    seqs = [llm.add_request(rng.integers(1, 50000, plen).tolist(), sp) for _ in range(batch)]
    t0 = time.perf_counter()
    while any(s.num_output_tokens == 0 for s in seqs):
        llm.step()
    t1 = time.perf_counter()
    # every stream decodes from here on, together: none ran ahead to its end while others prefilled
    assert all(s.num_output_tokens <= gen for s in seqs), "the KV pool does not hold every stream at once"
    while llm.has_unfinished():
        llm.step()
    t2 = time.perf_counter()
    assert all(s.num_output_tokens == gen + 1 for s in seqs)
    return batch * plen / (t1 - t0), batch * gen / (t2 - t1)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def read_bandwidth(threads: int) -> float:
    """Bytes/s of summing a 1 GiB float32 tensor with threads threads: the memory's read rate."""
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def decode_bytes(llm) -> int:
    """Weight bytes one decode step reads: the packed GEMM weights (layers and head) and the norms,
    biases and one embedding row, which round to the GEMMs'."""
    mem = llm.model.memory_bytes()
    return mem["packed"] + mem["stored"]


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = ("prefill", "decode_x1", "decode_x16")
    fig, ax = plt.subplots(figsize=(8, 4.8))
    pairs = [k for k, v in res.items() if isinstance(v, dict) and "ratio" in v]
    width = 0.8 / len(pairs)
    for i, pair in enumerate(pairs):
        ratios = [res[pair].get("median_round_ratio", res[pair]["ratio"])[c] for c in cases]
        ours, theirs = pair.split("/")
        bars = ax.bar(np.arange(len(cases)) + (i - (len(pairs) - 1) / 2) * width, ratios, width,
                      label=f"ours {ours} / llama.cpp {theirs}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(cases)), ["prefill 128", "decode, 1 stream", "decode, 16 streams"])
    ax.set_ylabel("tokens/s ratio, ours / llama.cpp (median of rounds)")
    ax.set_title(f"GPT-2 124M shape on CPU, {res['threads']} threads")
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.6))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "gpt-engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", default=",".join(f"{o}/{t}" for o, t in PAIRS), help="which pairs (ours/theirs)")
    ap.add_argument("--kv-context", type=int, default=0, help="also compare KV cache formats at this context")
    ap.add_argument("--out", type=Path, default=RESULTS / "llamacpp.json")
    ap.add_argument("--plot", action="store_true", help="only redraw the chart from --out's JSON")
    args = ap.parse_args()
    if args.plot:
        return plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
    src = llama_cpp(args.cache)
    rng = np.random.default_rng(args.seed)
    res: dict = {"threads": args.threads, "prompt": args.prompt, "gen": args.gen, "batch": args.batch,
                 "repeats": args.repeats, "cpu": cpu_name(), "load_avg_1m": round(os.getloadavg()[0], 2),
                 "llama_cpp_python_sdist": LLAMA_CPP_PYTHON, "read_bandwidth_GBps": read_bandwidth(args.threads) / 1e9}
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]
    model = _model(args.cache, args.seed, 1024)
    for ours, theirs in pairs:
        gguf = convert(src, model, theirs)
        llm = ours_engine(model, ours, args.threads)
        res[f"{ours}/{theirs}"] = _rounds(
            llm, args, rng, lambda: llama_bench(src, gguf, args.threads, args.prompt, args.gen),
            lambda: llama_batched(src, gguf, args.threads, args.prompt, args.gen, args.batch),
            dict(ours=decode_bytes(llm), theirs=gguf.stat().st_size), f"{ours}/{theirs}")
        del llm
    if args.kv_context:  # the KV cache formats at a long context, w8a8 / q8_0 weights
        long = _model(args.cache, args.seed, args.kv_context + args.gen + 16)
        gguf = convert(src, long, "q8_0")
        kv_args = argparse.Namespace(**{**vars(args), "prompt": args.kv_context})
        res["kv_context"] = args.kv_context
        for ours_kv, theirs_kv in (("int8", "q8_0"),):
            llm = ours_engine(long, "w8a8", args.threads, ours_kv, args.batch * (args.kv_context + args.gen + 16))
            res[f"kv {ours_kv}/{theirs_kv}"] = _rounds(
                llm, kv_args, rng, lambda: llama_bench(src, gguf, args.threads, args.kv_context, args.gen, theirs_kv),
                lambda: llama_batched(src, gguf, args.threads, args.kv_context, args.gen, args.batch, theirs_kv),
                None, f"kv {ours_kv}/{theirs_kv}")
            del llm
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print("wrote", args.out)


def _model(cache: Path, seed: int, positions: int) -> Path:
    model = cache / (f"gpt2-random-{seed}" if positions == 1024 else f"gpt2-random-{seed}-{positions}")
    if not (model / "config.json").exists():
        model.mkdir(parents=True, exist_ok=True)
        write_model(model, seed, positions)
    return model


def _rounds(llm, args, rng, theirs_x1, theirs_x16, nbytes: dict | None, label: str) -> dict:
    """Both engines in alternating turns, args.repeats rounds -> each one's best per case, the median of
    the rounds' paired ratios, and (nbytes) the weight bytes a decode step reads."""
    cases = ("prefill", "decode_x1", "decode_x16")
    ours_run(llm, args.prompt, 4, 1, rng)  # warm-up
    rounds = {"ours": [], "llama.cpp": []}
    for _ in range(args.repeats):
        pp, tg = ours_run(llm, args.prompt, args.gen, 1, rng)
        _, tg16 = ours_run(llm, args.prompt, args.gen, args.batch, rng)
        rounds["ours"].append(dict(zip(cases, (pp, tg, tg16))))
        lpp, ltg = theirs_x1()
        rounds["llama.cpp"].append(dict(zip(cases, (lpp, ltg, theirs_x16()))))
    best = {name: {k: max(r[k] for r in rs) for k in cases} for name, rs in rounds.items()}
    if nbytes is not None:
        for name, key in (("ours", "ours"), ("llama.cpp", "theirs")):
            best[name]["decode_bytes"] = nbytes[key]
            best[name]["decode_x1_GBps"] = nbytes[key] * best[name]["decode_x1"] / 1e9
    best["ratio"] = {k: best["ours"][k] / best["llama.cpp"][k] for k in cases}
    best["median_round_ratio"] = {k: statistics.median(o[k] / t[k] for o, t in zip(rounds["ours"], rounds["llama.cpp"]))
                                  for k in cases}
    best["rounds"] = rounds
    for name in ("ours", "llama.cpp", "ratio", "median_round_ratio"):
        print(label, name, {k: round(v, 2) for k, v in best[name].items()}, flush=True)
    return best


if __name__ == "__main__":
    main()
