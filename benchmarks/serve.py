"""Online serving benchmark: `gpt-engine serve` started with a model directory or a random-init
preset on a free loopback port, then `gpt-engine bench serve` against it (its flags after ours).

    python -m benchmarks.serve gpt2-tiny --server-args "--device cpu" --num-prompts 32 --request-rate 4 \
        --input-len 64 --output-len 32 --out r.json --plot r.png

A preset gets a small BPE tokenizer in which bench serve's prompt words are about a token each,
so --input-len words are about as many prompt tokens; the report adds the server's flags and the
machine's load average before the run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from gpt_engine.cli import bench_serve


def preset_dir(spec: str, tmp: str, seed: int) -> str:
    """spec itself if a directory, else a random-init preset (gpt2-tiny, ...) saved under tmp
    with a small tokenizer (the server needs one to detokenize)."""
    if Path(spec).is_dir():
        return spec
    from gpt_engine.cli.bench import model_dir
    from gpt_engine.tokenizer import Tokenizer
    path = model_dir(spec, tmp, seed)
    words = " ".join(bench_serve.WORDS)
    Tokenizer.train([Path(__file__).read_text()] * 4 + [words] * 50, vocab_size=512, show_progress=False).save(path)
    return path


@contextmanager
def local_server(model_dir: str, extra: list[str], api_key: str | None):
    """`gpt-engine serve` in a subprocess on a free loopback port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # CPU takes the torch path, not the Triton interpreter
    if api_key:
        env["GPT_ENGINE_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "gpt_engine", "serve", model_dir, "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("server did not come up in 300 s")
        yield base
    finally:
        proc.terminate()  # SIGTERM: the graceful path
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("model", help="model directory or random-init preset (gpt2-tiny, ...)")
    p.add_argument("--server-args", default="", help="`gpt-engine serve` flags, e.g. '--device cpu'")
    args, rest = p.parse_known_args(argv)
    load = os.getloadavg()[0]  # on a shared machine, what else ran: the numbers are read against it
    bench = argparse.ArgumentParser(prog="gpt-engine bench serve")
    bench_serve.add_args(bench)
    with tempfile.TemporaryDirectory() as tmp:
        path = preset_dir(args.model, tmp, seed=0)
        name = [] if path == args.model else ["--served-model-name", args.model]  # not the temporary folder's
        with local_server(path, args.server_args.split() + name, os.environ.get("OPENAI_API_KEY")) as base:
            bargs = bench.parse_args(["--base-url", base, *rest])
            r = asyncio.run(bench_serve.benchmark(bargs))
    r.update(server_model=args.model, server_args=args.server_args, cpu_count=os.cpu_count(), load_average_1m=load)
    bench_serve.report(r, bargs)
    return r


if __name__ == "__main__":
    main()
