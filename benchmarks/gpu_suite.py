"""The GPU suite: runs every benchmarks/gpu_*.py module's main(outdir) and writes
benchmarks/results/<device>/summary.md from the markdown sections they return.

    python -m benchmarks.gpu_suite [--only attention,norm] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import time
import traceback
from pathlib import Path

import torch

import benchmarks


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", default="", help="comma-separated suite names (gpu_<name>.py)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the GPU suite needs a CUDA device")
    out = Path(args.out or Path(__file__).parent / "results" / device_slug())
    out.mkdir(parents=True, exist_ok=True)
    names = [m.name[4:] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("gpu_")
             and m.name != "gpu_suite"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    sections = [f"# GPU benchmarks on {torch.cuda.get_device_name()}\n\ntorch {torch.__version__}, "
                f"{time.strftime('%Y-%m-%d')}\n"]
    for name in names:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.gpu_{name}")
            sections.append(mod.main(out))
        except Exception:
            traceback.print_exc()
            sections.append(f"## {name}\n\nFAILED:\n```\n{traceback.format_exc()[-2000:]}\n```\n")
        print(f"   {name} took {time.time() - t0:.0f}s", flush=True)
    summary = out / ("summary.md" if not args.only else f"summary-{args.only.replace(',', '-')}.md")
    summary.write_text("\n\n".join(sections))
    print(summary.read_text())


if __name__ == "__main__":
    main()
