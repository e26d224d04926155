"""Soak: `gpt-engine serve` on a tiny random-init model, driven for a long while by a few client threads
with mixed traffic (streams, streams dropped mid-way, n > 1, long and short prompts, stop strings, chat,
bad requests that must get a 4xx), sampled every --interval seconds: the server's RSS, open file
descriptors and threads (/proc/PID), KV blocks in use (/metrics) and the p99 latency of the requests that
ended in the window. A leak shows as a last-quarter slope well above zero after the first quarter's
warm-up. Not part of `make test`.

    python -m benchmarks.soak [--minutes 20] [--clients 4] [--interval 10]

Writes benchmarks/results/cpu/soak.json (the samples and a summary: per series the mean and the
least-squares slope per minute of the first and last quarter, and the max) and soak.png; exits 1 if the
server died, a bad request got anything but a 4xx, KV blocks stayed in use once idle, or /health is not
200 at the end.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.flood import KEY, kv_usage, start_server, tiny_model

NUM_KV_BLOCKS = 128
OUT = Path(__file__).resolve().parent / "results" / "cpu"
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
WORDS = "the quick brown fox jumps over the lazy dog hello world server".split()
# bodies the server must refuse with a 4xx (path, body; a str is sent as it is)
BAD = [("/v1/completions", {"prompt": "hi", "max_tokens": -3}),
       ("/v1/completions", {"prompt": "hi", "n": 0}),
       ("/v1/completions", {"prompt": "hi", "temperature": -1}),
       ("/v1/completions", {"prompt": "hi", "no_such_field": 1}),
       ("/v1/completions", {"prompt": "hello " * 400, "max_tokens": 4}),
       ("/v1/chat/completions", {"messages": "not a list"}),
       ("/v1/completions", "{not json")]


def _prompt(rng: random.Random, long: bool) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80) if long else rng.randint(1, 8)))


class Traffic:
    """One client thread's loop of random requests until stop; records (end time, latency, kind, outcome)."""

    def __init__(self, url: str, seed: int, stop: threading.Event, log: list, lock: threading.Lock):
        self.url, self.rng, self.stop, self.log, self.lock = url, random.Random(seed), stop, log, lock

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as c:
            while not self.stop.is_set():
                kind = self.rng.choice(["short", "long", "stream", "drop", "n", "stops", "chat", "chat_stream",
                                        "bad"])
                t = time.perf_counter()
                try:
                    outcome = getattr(self, kind)(c)
                except httpx.HTTPError as e:
                    outcome = f"error: {type(e).__name__}"
                with self.lock:
                    self.log.append((time.time(), time.perf_counter() - t, kind, outcome))

    def _body(self, long=False, **kw) -> dict:
        return {"prompt": _prompt(self.rng, long), "max_tokens": self.rng.randint(1, 32), "ignore_eos": True,
                "temperature": self.rng.choice([0, 0.8]), **kw}

    @staticmethod
    def _ok(r: httpx.Response) -> str:
        return "ok" if r.status_code == 200 else f"status {r.status_code}"

    def short(self, c):
        return self._ok(c.post("/v1/completions", json=self._body()))

    def long(self, c):
        return self._ok(c.post("/v1/completions", json=self._body(long=True)))

    def n(self, c):
        return self._ok(c.post("/v1/completions", json=self._body(n=self.rng.randint(2, 4))))

    def stops(self, c):
        return self._ok(c.post("/v1/completions", json=self._body(stop=["fox", " the", "\n"], ignore_eos=False)))

    def stream(self, c):
        with c.stream("POST", "/v1/completions", json=self._body(long=self.rng.random() < 0.5, stream=True)) as r:
            lines = [x for x in r.iter_lines() if x]
        return "ok" if r.status_code == 200 and lines[-1:] == ["data: [DONE]"] else f"status {r.status_code}"

    def drop(self, c):
        """A stream the client walks away from after a few chunks (a disconnect mid-stream)."""
        body = self._body(long=self.rng.random() < 0.5, stream=True, max_tokens=40)  # within the 128-token context
        with c.stream("POST", "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= self.rng.randint(1, 4):
                    break
        return "dropped" if r.status_code == 200 else f"status {r.status_code}"

    def _chat(self, **kw) -> dict:
        msgs = [{"role": "user", "content": _prompt(self.rng, self.rng.random() < 0.3)}]
        return {"messages": msgs, "max_tokens": self.rng.randint(1, 24), "n": self.rng.choice([1, 1, 2]), **kw}

    def chat(self, c):
        return self._ok(c.post("/v1/chat/completions", json=self._chat()))

    def chat_stream(self, c):
        with c.stream("POST", "/v1/chat/completions", json=self._chat(stream=True)) as r:
            lines = [x for x in r.iter_lines() if x]
        return "ok" if r.status_code == 200 and lines[-1:] == ["data: [DONE]"] else f"status {r.status_code}"

    def bad(self, c):
        path, body = self.rng.choice(BAD)
        r = c.post(path, content=body) if isinstance(body, str) else c.post(path, json=body)
        return "refused" if 400 <= r.status_code < 500 else f"bad request got {r.status_code}"


def proc_stats(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def _slope(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over ts."""
    if len(ts) < 2:
        return None
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else None


def summarize(samples: list[dict], keys: list[str]) -> dict:
    """Per series: mean and slope (per minute) of the first and last quarter of the samples, and the max."""
    q = max(2, len(samples) // 4)
    out = {}
    for k in keys:
        pts = [(s["minute"], s[k]) for s in samples if s[k] is not None]
        if not pts:
            continue
        first, last = pts[:q], pts[-q:]
        out[k] = {"first_quarter_mean": sum(y for _, y in first) / len(first),
                  "last_quarter_mean": sum(y for _, y in last) / len(last),
                  "first_quarter_slope_per_min": _slope(*zip(*first)) if len(first) > 1 else None,
                  "last_quarter_slope_per_min": _slope(*zip(*last)) if len(last) > 1 else None,
                  "max": max(y for _, y in pts)}
    return out


def plot(samples: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = [("rss_mb", "RSS (MB)"), ("fds", "open fds"), ("threads", "threads"),
              ("kv_blocks_in_use", f"KV blocks in use (of {NUM_KV_BLOCKS})"), ("p99_latency_s", "p99 latency (s)"),
              ("requests", "requests / window")]
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.0 * len(series)), sharex=True)
    for ax, (k, label) in zip(axes, series):
        pts = [(s["minute"], s[k]) for s in samples if s[k] is not None]
        if pts:
            ax.plot(*zip(*pts), ".-", lw=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle("gpt-engine serve soak (CPU, tiny model, shared machine)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def soak(url: str, pid: int, minutes: float, clients: int, interval: float) -> tuple[list[dict], list]:
    stop, lock, log = threading.Event(), threading.Lock(), []
    threads = [threading.Thread(target=Traffic(url, seed, stop, log, lock).run) for seed in range(clients)]
    for t in threads:
        t.start()
    samples, t0, seen = [], time.time(), 0
    try:
        while time.time() - t0 < minutes * 60:
            time.sleep(min(interval, max(0.0, t0 + minutes * 60 - time.time())))
            with lock:
                window, seen = log[seen:], len(log)
            lat = [dt for _, dt, _, outcome in window if outcome == "ok"]
            samples.append({"minute": round((time.time() - t0) / 60, 3), **proc_stats(pid),
                            "kv_blocks_in_use": round(kv_usage(url) * NUM_KV_BLOCKS),
                            "p99_latency_s": p99(lat), "requests": len(window),
                            "failures": sum(not o.startswith(("ok", "dropped", "refused")) for *_, o in window)})
            print(json.dumps(samples[-1]), flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    return samples, log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=OUT / "soak.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        tiny_model(model)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
        with open(Path(tmp) / "serve.log", "w") as server_log:
            proc, url = start_server(model, server_log, num_kv_blocks=NUM_KV_BLOCKS)
            try:
                samples, log = soak(url, proc.pid, args.minutes, args.clients, args.interval)
                deadline = time.time() + 60  # idle: every block back in the pool
                while kv_usage(url) > 0 and time.time() < deadline:
                    time.sleep(0.5)
                idle = {"kv_blocks_in_use_idle": round(kv_usage(url) * NUM_KV_BLOCKS), **proc_stats(proc.pid)}
                health = httpx.get(url + "/health", timeout=30).status_code
                alive = proc.poll() is None
            finally:
                proc.terminate()
                proc.wait(60)
    outcomes: dict[str, int] = {}
    for *_, o in log:
        outcomes[o] = outcomes.get(o, 0) + 1
    keys = ["rss_mb", "fds", "threads", "kv_blocks_in_use", "p99_latency_s"]
    res = {"minutes": args.minutes, "clients": args.clients, "interval_s": args.interval,
           "num_kv_blocks": NUM_KV_BLOCKS, "requests": len(log), "outcomes": outcomes,
           "summary": summarize(samples, keys), "after_idle": idle, "health_at_end": health,
           "note": "CPU, tiny random-init GPT-2 (2 layers, d_model 64); a shared 2-core machine", "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    plot(samples, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    wrong = [o for o in outcomes if not o.startswith(("ok", "dropped", "refused"))]
    ok = alive and health == 200 and idle["kv_blocks_in_use_idle"] == 0 and not wrong
    if not ok:
        print(f"FAILED: alive={alive} health={health} idle={idle} unexpected outcomes={wrong}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
