"""Flood benchmark: a few thousand concurrent requests (valid, malformed and oversized) against
`gpt-engine serve` on loopback, then a mass disconnect. Reports requests sent, rejected (4xx,
429), completed, the server's peak resident memory, the slowest /health answer during the
flood, and the KV blocks still in use after the disconnect (leaked).

    python benchmarks/flood.py [--requests 3000] [--model DIR] [--out benchmarks/results/cpu/flood.json]
    python benchmarks/flood.py --url http://127.0.0.1:8000 --requests 1000   (a server already up)

Without --model it builds a small random-init GPT-2 with a trained tokenizer. The server gets
its own small KV pool (--num-kv-blocks) so the flood is far past what it can hold at once.
Self-contained (no imports from the repository's tests or benchmarks) so it runs as a script.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

KEY = "flood-key"
NUM_KV_BLOCKS = 64


def _payloads(i: int, rng: random.Random) -> tuple[str, object]:
    """The i-th request body: mostly valid, some malformed or abusive."""
    kind = rng.random()
    if kind < 0.70:
        return "valid", {"prompt": f"flood {i}: hello", "max_tokens": 8, "ignore_eos": True, "stream": i % 2 == 0}
    if kind < 0.80:
        return "bad", {"prompt": "hi", "max_tokens": -3}
    if kind < 0.85:
        return "bad", {"prompt": "hi", "stop": ["x" * 5000]}
    if kind < 0.90:
        return "bad", {"prompt": [[1] * 4] * 400}
    if kind < 0.95:
        return "bad", {"prompt": "hi", "max_tokens": 10**6}
    return "bad", "{not json"


async def flood(url: str, n: int, seed: int = 0, key: str = KEY, timeout: float = 300) -> dict:
    """n concurrent requests -> counts by outcome, and the slowest /health answer meanwhile."""
    rng = random.Random(seed)
    bodies = [_payloads(i, rng) for i in range(n)]
    counts = {"sent": n, "completed": 0, "rejected_4xx": 0, "rejected_429": 0, "other": 0}
    health = []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as c:
        async def one(kind, body):
            content = body if isinstance(body, str) else json.dumps(body)
            try:
                async with c.stream("POST", "/v1/completions", content=content) as r:
                    text = (await r.aread()).decode()
            except httpx.HTTPError:
                counts["other"] += 1
                return
            if r.status_code == 429:
                counts["rejected_429"] += 1
            elif 400 <= r.status_code < 500:
                counts["rejected_4xx"] += 1
            elif r.status_code == 200 and '"error"' not in text:
                counts["completed"] += 1
            else:
                counts["other"] += 1

        def probe():  # its own thread and connection: the flood's event loop does not delay it
            with httpx.Client(base_url=url, timeout=30) as h:
                while not stop.is_set():
                    t = time.perf_counter()
                    r = h.get("/health")
                    health.append((time.perf_counter() - t, r.status_code))
                    time.sleep(0.05)

        stop = threading.Event()
        prober = threading.Thread(target=probe)
        prober.start()
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(one(k, b) for k, b in bodies)), timeout)
        finally:
            counts["flood_s"] = round(time.perf_counter() - t0, 2)
            stop.set()
            prober.join()
    counts["health_max_s"] = round(max(t for t, _ in health), 3) if health else None
    counts["health_all_200"] = all(s == 200 for _, s in health)
    return counts


async def mass_disconnect(url: str, n: int, key: str = KEY) -> None:
    """n streams opened and dropped after their first chunk."""
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=limits) as c:
        async def one(i):
            body = {"prompt": f"drop {i}", "max_tokens": 100, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code == 200:
                    async for _ in r.aiter_lines():
                        break
        await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def kv_usage(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("gpt_engine_kv_cache_usage_perc "):
            return float(line.split()[1])
    raise RuntimeError("no kv_cache_usage_perc in /metrics")


def wait_kv_empty(url: str, timeout: float) -> tuple[float, float]:
    """(seconds until the KV pool was empty or timeout, the last usage seen)."""
    t0 = time.perf_counter()
    while True:
        u = kv_usage(url)
        if u == 0.0 or time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0, u
        time.sleep(0.1)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def tiny_model(d: Path) -> None:
    import transformers

    from gpt_engine.tokenizer import Tokenizer
    corpus = "the quick brown fox jumps over the lazy dog. hello world, hello server! " * 50
    Tokenizer.train([corpus], vocab_size=320, show_progress=False).save(d)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=384, n_positions=128, bos_token_id=0,
        eos_token_id=0)).save_pretrained(d)


def start_server(model: Path, log, num_kv_blocks: int = NUM_KV_BLOCKS) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GPT_ENGINE_API_KEY": KEY, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "gpt_engine", "serve", str(model), "--port", str(port),
                             "--device", "cpu", "--num-kv-blocks", str(num_kv_blocks), "--max-num-seqs", "16",
                             "--log-level", "warning"], env=env, stdout=log, stderr=log)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the server did not come up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--disconnects", type=int, default=200)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--url", default=None, help="a server already up (its key in $GPT_ENGINE_API_KEY)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.url:
        res = asyncio.run(flood(args.url, args.requests, key=os.environ.get("GPT_ENGINE_API_KEY", KEY)))
        print(json.dumps(res))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or Path(tmp) / "model"
        if args.model is None:
            model.mkdir()
            tiny_model(model)
        with open(Path(tmp) / "serve.log", "w") as log:
            proc, url = start_server(model, log)
            try:
                rss_start = peak_rss_mb(proc.pid)
                res = asyncio.run(flood(url, args.requests))
                _, usage = wait_kv_empty(url, 30)
                asyncio.run(mass_disconnect(url, args.disconnects))
                empty_s, usage = wait_kv_empty(url, 30)
                res.update(disconnects=args.disconnects, kv_empty_after_disconnect_s=round(empty_s, 2),
                           leaked_kv_blocks=round(usage * NUM_KV_BLOCKS), num_kv_blocks=NUM_KV_BLOCKS,
                           rss_at_start_mb=round(rss_start, 1), peak_rss_mb=round(peak_rss_mb(proc.pid), 1),
                           health_after=httpx.get(url + "/health", timeout=30).status_code)
            finally:
                proc.terminate()
                proc.wait(60)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
