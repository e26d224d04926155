"""Peak memory of load_model against the checkpoint's size, per file layout.

Builds (once, under --cache) a random-init llama checkpoint of about 620 MB in fp32 as transformers
saves it: one model.safetensors, safetensors shards with model.safetensors.index.json, and one
pytorch_model.bin. Each is then loaded in a fresh process; the peak resident memory the load adds to
that process (its high-water mark VmHWM, reset once torch and gpt_engine are imported, minus the
resident memory then) is divided by the checkpoint's bytes. Resident memory counts the pages of a
memory-mapped file the process has touched, so a loader that maps the file and copies out of it shows
up here. (ru_maxrss would do on its own only in a child of a small parent: Linux carries the parent's
peak across fork and exec.)

    python benchmarks/load_memory.py [--cache DIR] [--keep] [--out benchmarks/results/cpu/load_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = ("safetensors", "safetensors-sharded", "pytorch_model.bin")
# untied llama with a 32k vocabulary: ~155M parameters, ~620 MB in fp32
MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SHARD = "200MB"
LIMIT = 1.3


def build(cache: Path) -> dict[str, Path]:
    """The three layouts of one random-init checkpoint under cache (reused when already there)."""
    dirs = {name: cache / name for name in LAYOUTS}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    import torch
    import transformers
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(dirs["safetensors"], max_shard_size="50GB")
    model.save_pretrained(dirs["safetensors-sharded"], max_shard_size=SHARD)
    d = dirs["pytorch_model.bin"]
    d.mkdir(parents=True)
    model.config.to_json_file(d / "config.json")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, d / "pytorch_model.bin")
    return dirs


def weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """VmHWM := the current resident size (Linux's clear_refs code 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_here(path: str) -> dict:
    """Run in the child process: load once, report the memory it took."""
    import gc

    import torch

    import gpt_engine
    from gpt_engine import load_model
    torch.ones(1) + 1  # the allocator and its first arena, before the baseline
    gc.collect()
    _reset_peak()
    base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = load_model(path)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM") - base
    held = _status_bytes("VmRSS") - base
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(peak_extra_rss=peak, rss_after_load=held, param_bytes=param_bytes, seconds=round(seconds, 2),
                gpt_engine=gpt_engine.__version__)


def measure(path: Path) -> dict:
    """Load path in a fresh interpreter, so no earlier load's pages or arenas count."""
    r = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if r.returncode != 0:
        raise RuntimeError(f"loading {path} failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gpt_engine_load_memory")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints under --cache for a rerun")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu" / "load_memory.json")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure_here(args.measure)))
        return
    if args.build:
        build(args.cache)
        return
    try:
        # built in a child: the parent never holds the model, so nothing it did counts in the children
        subprocess.run([sys.executable, __file__, "--build", "--cache", str(args.cache)], check=True)
        dirs = {name: args.cache / name for name in LAYOUTS}
        rows = []
        for name, d in dirs.items():
            size = weight_bytes(d)
            m = measure(d)
            row = dict(layout=name, files=sorted(x.name for x in d.iterdir() if x.suffix in (".safetensors", ".bin")),
                       checkpoint_bytes=size, **m, peak_ratio=round(m["peak_extra_rss"] / size, 3),
                       within_limit=m["peak_extra_rss"] <= LIMIT * size)
            rows.append(row)
            print(f"{name:22s} {size / 2**20:7.0f} MiB on disk  peak +{m['peak_extra_rss'] / 2**20:7.0f} MiB  "
                  f"ratio {row['peak_ratio']:.3f}  held {m['rss_after_load'] / 2**20:6.0f} MiB  {m['seconds']} s")
    finally:
        if not args.keep:
            shutil.rmtree(args.cache, ignore_errors=True)
    result = dict(config=dict(model="llama (random init)", **MODEL, dtype="float32", shard_size=SHARD,
                              limit_ratio=LIMIT, cpu_count=os.cpu_count(), python=platform.python_version(),
                              date=time.strftime("%Y-%m-%d %H:%M:%S")),
                  results=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not all(r["within_limit"] for r in rows):
        sys.exit(f"peak resident memory above {LIMIT}x the checkpoint's size")


if __name__ == "__main__":
    main()
