"""gpt-engine bench serve: a load generator for any OpenAI-compatible server (ours, vLLM, llama.cpp's).

N streamed requests, sent at a Poisson request rate (inf: all at once) and at most C at a time;
reports throughput, time to first token (TTFT), time per output token (TPOT), inter-token latency
(ITL) and end-to-end latency (E2EL), with the names `vllm bench serve` gives them.

    gpt-engine bench serve --base-url http://127.0.0.1:8000 --num-prompts 32 --max-concurrency 8
    gpt-engine bench serve --base-url URL --request-rate 4 --dataset prompts.jsonl --out r.json --plot r.png

Synthetic prompts are random common English words (about a token each in a BPE vocabulary). The
output length goes as max_tokens with ignore_eos (vLLM's and our extension; --no-ignore-eos for a
server that refuses unknown fields). Each streamed chunk with a choice is a token arrival, empty
text included (a token whose bytes the server holds back until they decode), except a chat
stream's opening role header and a text-less closing chunk. Output tokens are counted from the usage chunk
(stream_options.include_usage) when the server sends one, else one per arrival.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

WORDS = ("the of and to in is was for on that with as by at from his her they this which have are had "
         "one were all we when your can said there use an each she how their will other about out many "
         "then them these so some would make like him into time has look two more write go see number no "
         "way could people my than first water been call who oil its now find long down day did get come "
         "made may part over new sound take only little work know place year live me back give most very "
         "after thing our just name good sentence man think say great where help through much before line").split()
# the longest a stream may stay silent (connecting: 10 s)
TIMEOUT_S = 600.0
METRICS = ("ttft", "tpot", "itl", "e2el")


def _count(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return n


def _rate(s: str) -> float:
    x = float(s)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 requests/s (inf: all at once), got {s}")
    return x


def _ratio(s: str) -> float:
    x = float(s)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return x


def add_args(p) -> None:
    p.add_argument("--base-url", required=True, help="the server's root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id to send (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions (default: completions)")
    p.add_argument("--num-prompts", type=_count, default=32, help="requests to send (default: 32)")
    p.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="Poisson arrivals, requests/s (default: inf, all at once)")
    p.add_argument("--max-concurrency", type=_count, default=None, help="at most this many requests at a time")
    p.add_argument("--input-len", type=_count, default=64, help="words of a synthetic prompt (default: 64)")
    p.add_argument("--output-len", type=_count, default=32, help="max_tokens of each request (default: 32)")
    p.add_argument("--range-ratio", type=_ratio, default=0.0,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)] (default: 0)")
    p.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help="prompts instead of synthetic ones: a `prompt` string or a `messages` list per line")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (for servers that refuse fields OpenAI's API lacks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrival times")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the latency CDFs")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


@dataclass
class Result:
    """One request's outcome; times in seconds from sending it."""
    input_tokens: int                   # the server's usage.prompt_tokens, else the prompt's words
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)


def read_dataset(path: str, endpoint: str) -> list:
    """The prompts of a .jsonl: each a string, or a messages list (chat only)."""
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            items.append(row["prompt"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            if endpoint != "chat":
                raise ValueError(f"{path}:{i}: a `messages` line needs --endpoint chat")
            items.append(row["messages"])
        else:
            raise ValueError(f"{path}:{i}: each line needs a `prompt` string or a `messages` list")
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def _lens(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def make_bodies(args, model: str) -> list[dict]:
    """One request body per prompt: the dataset's in order (the file repeated if shorter), else synthetic."""
    rng = random.Random(args.seed)
    n = args.num_prompts
    if args.dataset:
        data = read_dataset(args.dataset, args.endpoint)
        prompts = [data[i % len(data)] for i in range(n)]
    else:
        prompts = [" ".join(rng.choices(WORDS, k=k)) for k in _lens(rng, n, args.input_len, args.range_ratio)]
    bodies = []
    for prompt, out_len in zip(prompts, _lens(rng, n, args.output_len, args.range_ratio)):
        body = {"model": model, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if args.endpoint == "chat":
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            body.update(messages=msgs, max_completion_tokens=out_len)
        else:
            body.update(prompt=prompt, max_tokens=out_len)
        if args.ignore_eos:
            body["ignore_eos"] = True
        bodies.append(body)
    return bodies


def _words(body: dict) -> int:
    if "prompt" in body:
        return len(body["prompt"].split())
    return sum(len(str(m.get("content") or "").split()) for m in body["messages"] if isinstance(m, dict))


def _is_output(choice: dict) -> bool:
    """A token arrival: text, or none (a token whose bytes the server holds back until they decode),
    but not a chat stream's opening role header nor a closing chunk with only a finish_reason."""
    delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
    text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
    return bool(text) or not (choice.get("finish_reason") or "role" in delta)


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


async def send(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    """One streamed request, timing each token arrival."""
    r = Result(input_tokens=_words(body))
    t0 = time.perf_counter()
    times, usage = [], None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
                return r
            async for line in resp.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if err := chunk.get("error"):
                    r.error = f"error in the stream: {err.get('message', err) if isinstance(err, dict) else err}"
                    return r
                usage = chunk.get("usage") or usage
                if any(_is_output(c) for c in chunk.get("choices") or ()):
                    times.append(time.perf_counter())
    except Exception as e:  # whatever one response does, it is one failed request, never the run's end
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.e2el = time.perf_counter() - t0
    if not times:
        r.error = "no output in the stream"
        return r
    r.ok, r.ttft = True, times[0] - t0
    r.itl = [b - a for a, b in zip(times, times[1:])]
    r.output_tokens = usage["completion_tokens"] if usage else len(times)
    r.input_tokens = usage["prompt_tokens"] if usage else r.input_tokens
    return r


async def get_model(client: httpx.AsyncClient, base: str) -> str:
    """The first model id of /v1/models."""
    resp = await client.get(base + "/v1/models")
    if resp.status_code != 200:
        raise ConnectionError(f"{base}/v1/models: HTTP {resp.status_code}: {_error_message(resp.content)}")
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, LookupError, TypeError):
        raise ConnectionError(f"{base}/v1/models names no model: pass --model") from None


async def benchmark(args) -> dict:
    """Run the load; -> the report (config, metrics, per-request lists)."""
    base = args.base_url.rstrip("/").removesuffix("/v1")
    url = base + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    conns = args.max_concurrency or args.num_prompts
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(TIMEOUT_S, connect=10.0),
                                 limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns)) as client:
        try:
            model = args.model or await get_model(client, base)
        except httpx.HTTPError as e:
            raise ConnectionError(f"cannot reach {base}: {type(e).__name__}: {e}") from None
        bodies = make_bodies(args, model)
        # one request first, as vLLM does: a wrong URL, key or model stops here, and the
        # server's first-call work stays out of the timed run
        first = await send(client, url, bodies[0])
        if not first.ok:
            raise ConnectionError(f"the first request to {url} failed: {first.error}")
        rng = random.Random(args.seed + 1)
        gaps = [0.0] + [rng.expovariate(args.request_rate) for _ in bodies[1:]]
        limit = asyncio.Semaphore(conns)
        bar = tqdm(total=len(bodies), disable=args.disable_tqdm, desc="requests")

        async def one(body):
            async with limit:
                r = await send(client, url, body)
            bar.update()
            return r
        tasks, t0, at = [], time.perf_counter(), 0.0
        for body, gap in zip(bodies, gaps):
            at += gap  # arrival times fixed in advance: a slow loop does not thin the load
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(body)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    config = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), base_url=base, endpoint=args.endpoint, model=model,
                  num_prompts=args.num_prompts, request_rate=args.request_rate if math.isfinite(args.request_rate)
                  else "inf", max_concurrency=args.max_concurrency, input_len=args.input_len,
                  output_len=args.output_len, range_ratio=args.range_ratio, dataset=args.dataset,
                  ignore_eos=args.ignore_eos, seed=args.seed)
    return {**config, **summarize(results, duration)}


def summarize(results: list[Result], duration: float) -> dict:
    """vLLM's result fields: totals, throughputs, mean/median/std/p90/p99 of each latency in ms, and
    per-request lists (seconds; null for a failed request)."""
    ok = [r for r in results if r.ok]
    n_in, n_out = sum(r.input_tokens for r in ok), sum(r.output_tokens for r in ok)
    out = dict(duration=duration, completed=len(ok), failed=len(results) - len(ok), total_input_tokens=n_in,
               total_output_tokens=n_out, request_throughput=len(ok) / duration, output_throughput=n_out / duration,
               total_token_throughput=(n_in + n_out) / duration,
               input_lens=[r.input_tokens if r.ok else None for r in results],
               output_lens=[r.output_tokens if r.ok else None for r in results],
               ttfts=[r.ttft for r in results], e2els=[r.e2el if r.ok else None for r in results],
               itls=[r.itl for r in results], errors=[r.error for r in results])
    for name, xs in latencies(out).items():
        ms = 1000 * np.asarray(xs, dtype=float)
        stats = dict(mean=ms.mean(), median=np.median(ms), std=ms.std(), p90=np.percentile(ms, 90),
                     p99=np.percentile(ms, 99)) if ms.size else dict.fromkeys(("mean", "median", "std", "p90", "p99"))
        out.update({f"{k}_{name}_ms": None if v is None else float(v) for k, v in stats.items()})
    return out


def latencies(r: dict) -> dict[str, list[float]]:
    """The successful requests' samples of each metric, in seconds: TPOT one per request of two or
    more tokens, ITL every gap of every request."""
    ok = [i for i, e in enumerate(r["errors"]) if not e]
    return {"ttft": [r["ttfts"][i] for i in ok],
            "tpot": [(r["e2els"][i] - r["ttfts"][i]) / (r["output_lens"][i] - 1) for i in ok if r["output_lens"][i] > 1],
            "itl": [x for i in ok for x in r["itls"][i]],
            "e2el": [r["e2els"][i] for i in ok]}


def format_report(r: dict) -> str:
    rows = [("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
            ("Benchmark duration (s)", r["duration"]), ("Total input tokens", r["total_input_tokens"]),
            ("Total generated tokens", r["total_output_tokens"]),
            ("Request throughput (req/s)", r["request_throughput"]),
            ("Output token throughput (tok/s)", r["output_throughput"]),
            ("Total token throughput (tok/s)", r["total_token_throughput"])]
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]
    lines += [f"{k + ':':<40}" + (f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in rows]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in METRICS:
        lines.append("{:-^50}".format(titles[name]))
        for stat in ("Mean", "Median", "P90", "P99"):
            v = r[f"{stat.lower()}_{name}_ms"]
            lines.append(f"{f'{stat} {name.upper()} (ms):':<40}" + ("-" if v is None else f"{v:.2f}"))
    lines.append("=" * 50)
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    """Empirical CDFs of TTFT, TPOT, ITL and E2EL, one panel each."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 7), layout="constrained")
    for ax, (name, xs) in zip(fig.subplots(2, 2).flat, latencies(r).items()):
        ms = np.sort(1000 * np.asarray(xs, dtype=float))
        ax.step(ms, np.arange(1, ms.size + 1) / max(ms.size, 1), where="post")
        ax.set(title=name.upper(), xlabel="ms", ylim=(0, 1.02),
               ylabel="fraction of " + ("gaps" if name == "itl" else "requests"))
        ax.grid(alpha=0.3)
    load = "sent at once" if r["request_rate"] == "inf" else f"Poisson {r['request_rate']} req/s"
    load += f", at most {r['max_concurrency']} at a time" if r["max_concurrency"] else ""
    fig.suptitle(f"{r['model']} /v1/{'chat/' if r['endpoint'] == 'chat' else ''}completions: "
                 f"{r['completed']} requests, {load}")
    fig.savefig(path, dpi=100)


def run(args) -> int:
    return report(asyncio.run(benchmark(args)), args)


def report(r: dict, args) -> int:
    """Print r, write --out and --plot; -> the exit code: 1 when a request failed."""
    print(format_report(r))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    if args.plot:
        plot(r, args.plot)
    if r["failed"]:
        first = list(dict.fromkeys(e for e in r["errors"] if e))[:3]
        print(f"gpt-engine bench serve: {r['failed']} of {r['num_prompts']} requests failed; first errors:\n  "
              + "\n  ".join(first), file=sys.stderr)
        return 1
    return 0
