"""Online serving benchmark, after vLLM's benchmark_serving: streamed completions sent at a
Poisson rate; reports throughput, time to first token (TTFT), inter-token latency (ITL).

    python -m benchmarks.serve --model DIR [--num-prompts 32 --request-rate 4 --input-len 64 --output-len 32]
    python -m benchmarks.serve --base-url http://127.0.0.1:8000 ...     (a server already up)

With --model it starts `gpt-engine serve` itself on a free loopback port. Prompts are random
token ids (exact input lengths) and outputs run to --output-len (ignore_eos), so every
request does the same work whatever the model.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Send one streamed completion; time each chunk that carries text or tokens."""
    t0 = time.perf_counter()
    times, usage, err = [], None, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    err = chunk["error"].get("message")
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        err = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if err or not times:
        return {"ok": False, "error": err or "no output"}
    n_out = usage["completion_tokens"] if usage else len(times)
    return {"ok": True, "ttft": times[0] - t0, "latency": end - t0, "output_tokens": n_out,
            "itl": [b - a for a, b in zip(times, times[1:])]}


async def run_load(base_url: str, model: str, args) -> tuple[list[dict], float]:
    rng = random.Random(args.seed)
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.num_prompts + 8, max_keepalive_connections=args.num_prompts + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        tasks = []
        t_start = time.perf_counter()
        for _ in range(args.num_prompts):
            # ids 1..199 exist in any byte-level vocab and avoid the usual eos id 0
            prompt = [rng.randrange(1, 200) for _ in range(args.input_len)]
            body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            tasks.append(asyncio.create_task(one_request(client, url, body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t_start


def summarize(results: list[dict], duration: float, args) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    tpot = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    out_tok = sum(r["output_tokens"] for r in ok)
    ms = lambda x: None if x is None else round(1000 * x, 3)  # noqa: E731
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "duration_s": round(duration, 3),
        "request_throughput_rps": round(len(ok) / duration, 3),
        "output_throughput_tok_s": round(out_tok / duration, 2),
        "total_throughput_tok_s": round((out_tok + len(ok) * args.input_len) / duration, 2),
        "mean_ttft_ms": ms(statistics.fmean(ttft)) if ttft else None,
        "p50_ttft_ms": ms(pct(ttft, 50)), "p99_ttft_ms": ms(pct(ttft, 99)),
        "mean_itl_ms": ms(statistics.fmean(itl)) if itl else None,
        "p50_itl_ms": ms(pct(itl, 50)), "p99_itl_ms": ms(pct(itl, 99)),
        "mean_tpot_ms": ms(statistics.fmean(tpot)) if tpot else None,
        "p50_e2e_latency_ms": ms(pct([r["latency"] for r in ok], 50)),
        "p99_e2e_latency_ms": ms(pct([r["latency"] for r in ok], 99)),
    }


def preset_dir(spec: str, tmp: str, seed: int) -> str:
    """spec itself if a directory, else a random-init preset (gpt2-tiny, ...) saved under tmp
    with a small tokenizer (the server needs one to detokenize)."""
    if Path(spec).is_dir():
        return spec
    from gpt_engine.cli.bench import model_dir
    from gpt_engine.tokenizer import Tokenizer
    path = model_dir(spec, tmp, seed)
    Tokenizer.train([Path(__file__).read_text()] * 4, vocab_size=512, show_progress=False).save(path)
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="model directory or random-init preset (gpt2-tiny): start a local server")
    p.add_argument("--served-model", default=None, help="model id to send (default: the server's first)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=4.0, help="Poisson rate, req/s (inf: all at once)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("GPT_ENGINE_API_KEY"))
    p.add_argument("--server-args", default="", help="extra `gpt-engine serve` flags, e.g. '--device cpu'")
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)

    def bench(base):
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.served_model or httpx.get(base + "/v1/models", headers=headers).json()["data"][0]["id"]
        # one request first so start-up work (allocation, first-call overheads) is not measured
        warm = {"model": model, "prompt": [1, 2, 3], "max_tokens": 2}
        httpx.post(base + "/v1/completions", json=warm, headers=headers, timeout=300)
        results, duration = asyncio.run(run_load(base, model, args))
        return model, summarize(results, duration, args)

    if args.model:
        with tempfile.TemporaryDirectory() as tmp:
            path = preset_dir(args.model, tmp, args.seed)
            with local_server(path, args.server_args.split(), args.api_key) as base:
                model, summary = bench(base)
    else:
        model, summary = bench(args.base_url)
    report = {"config": {"model": args.model or model, "num_prompts": args.num_prompts,
                         "request_rate": args.request_rate, "input_len": args.input_len,
                         "output_len": args.output_len, "seed": args.seed, "server_args": args.server_args,
                         "cpu_count": os.cpu_count(),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "results": summary}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
