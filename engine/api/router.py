"""Data-parallel serving: N engine replicas behind one API server.

Each replica is a `gpt-engine serve` process of its own on a loopback port (its own engine, KV pool and
threads), reachable only with a key made at start. The front server routes every request as SGLang's
cache-aware router does: to the replica that already served the longest prefix of the request's text
(so its prefix cache holds it), unless that replica has more requests in flight than the least loaded one
plus BALANCE; otherwise, and for a prefix never seen, to the least loaded. Streams are proxied as they
come. /metrics sums the replicas' series and adds the router's own; a replica that dies (its process
ends, or it cannot be reached) is taken out of routing and reported in /health and the log, and the
others keep serving; with none left /health answers 503 and the front server exits non-zero.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import sys
import time
from collections import OrderedDict

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.background import BackgroundTask

from .metrics import PREFIX
from .protocol import error_body

log = logging.getLogger("gpt_engine.api.router")
CHUNK = 64             # characters per prefix step the router remembers
MAX_CHUNKS = 64        # the prefix it looks at: 4096 characters
MAX_PREFIXES = 65536   # remembered prefix steps per replica (least recently used go)
BALANCE = 4            # requests in flight above the least loaded replica before affinity gives way
POST_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


def request_text(body: dict) -> str:
    """The text whose prefix decides the replica: the prompt, or the messages' roles and contents."""
    if "messages" in body:
        return "".join(f"{m.get('role')}:{m.get('content')}\n" for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", body.get("tokens", ""))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its first prompt
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def prefix_keys(text: str) -> list[int]:
    """Hashes of the text's prefixes at every CHUNK characters (each one covers all before it)."""
    return [hash(text[:i]) for i in range(CHUNK, min(len(text), CHUNK * MAX_CHUNKS) + 1, CHUNK)]


class Replica:
    def __init__(self, index: int, url: str, proc: subprocess.Popen | None = None):
        self.index, self.url, self.proc = index, url, proc
        self.inflight, self.routed, self.alive, self.why = 0, 0, True, None
        self.prefixes: OrderedDict[int, None] = OrderedDict()

    def matched(self, keys: list[int]) -> int:
        n = 0
        for k in keys:
            if k not in self.prefixes:
                break
            n += 1
        return n

    def remember(self, keys: list[int]) -> None:
        for k in keys:
            self.prefixes[k] = None
            self.prefixes.move_to_end(k)
        while len(self.prefixes) > MAX_PREFIXES:
            self.prefixes.popitem(last=False)


class Router:
    def __init__(self, replicas: list[Replica], key: str):
        self.replicas, self.key = replicas, key
        self.registry = r = CollectorRegistry()
        self.routed = Counter(PREFIX + "router_requests", "Requests routed, by replica and reason",
                              ["replica", "reason"], registry=r)
        self.up = Gauge(PREFIX + "router_replica_up", "Whether a replica is in routing", ["replica"], registry=r)
        for rep in replicas:
            self.up.labels(str(rep.index)).set(1)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def pick(self, text: str) -> Replica:
        """The replica for a request (RuntimeError: none is left)."""
        live = self.live()
        if not live:
            raise RuntimeError("no engine replica is left")
        keys = prefix_keys(text)
        least = min(live, key=lambda r: (r.inflight, r.routed))  # ties: the one routed to least
        best = max(live, key=lambda r: (r.matched(keys), -r.inflight))
        hit = best.matched(keys) > 0 and best.inflight <= least.inflight + BALANCE
        chosen = best if hit else least
        chosen.remember(keys)
        chosen.routed += 1
        self.routed.labels(str(chosen.index), "prefix" if hit else "load").inc()
        return chosen

    def drop(self, rep: Replica, why: str) -> None:
        if rep.alive:
            rep.alive, rep.why = False, why
            self.up.labels(str(rep.index)).set(0)
            log.error("engine replica %d (%s) is out of routing: %s", rep.index, rep.url, why)

    async def watch(self, period: float = 0.5) -> None:
        """Takes a replica whose process ended out of routing."""
        while True:
            for rep in self.replicas:
                if rep.alive and rep.proc is not None and rep.proc.poll() is not None:
                    self.drop(rep, f"its process exited with code {rep.proc.returncode}")
            await asyncio.sleep(period)


def _error(status: int, message: str, type_: str = "server_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_), status_code=status)


def build_router_app(router: Router, client: httpx.AsyncClient) -> FastAPI:
    """The front server's app: the API paths proxied to a replica, /health and /metrics over them all."""
    app = FastAPI(title="gpt-engine", docs_url=None, redoc_url=None)
    auth = {"Authorization": f"Bearer {router.key}"}

    async def forward(rep: Replica, method: str, path: str, body: bytes | None, query: str) -> Response:
        url = rep.url + path + (f"?{query}" if query else "")
        rep.inflight += 1
        try:
            req = client.build_request(method, url, content=body,
                                       headers={**auth, "content-type": "application/json"})
            upstream = await client.send(req, stream=True)
        except httpx.TransportError as e:
            rep.inflight -= 1
            router.drop(rep, f"unreachable: {type(e).__name__}")
            raise
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}

        async def done():
            rep.inflight -= 1
            await upstream.aclose()

        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers,
                                 background=BackgroundTask(done))

    async def proxy(request: Request, text: str | None) -> Response:
        body = await request.body() if request.method == "POST" else None
        for _ in range(len(router.replicas)):  # a replica found dead on the way: the next one
            try:
                rep = router.pick(text) if text is not None else min(router.live(), key=lambda r: r.inflight)
            except (RuntimeError, ValueError):
                return _error(503, "no engine replica is left")
            try:
                return await forward(rep, request.method, request.url.path, body, request.url.query)
            except httpx.TransportError:
                continue
        return _error(503, "no engine replica is left")

    for path in POST_PATHS:
        @app.post(path, include_in_schema=False)
        async def post(request: Request):
            try:
                text = request_text(json.loads(await request.body() or b"{}"))
            except (ValueError, AttributeError):
                text = ""  # the replica answers the bad body with its 400
            return await proxy(request, text)

    @app.get("/v1/models", include_in_schema=False)
    @app.get("/v1/models/{model_id:path}", include_in_schema=False)
    @app.get("/", include_in_schema=False)
    async def get(request: Request):
        return await proxy(request, None)

    @app.get("/health")
    async def health():
        reps = [{"replica": r.index, "alive": r.alive, **({"error": r.why} if r.why else {})}
                for r in router.replicas]
        ok = bool(router.live())
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": reps}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        texts = await asyncio.gather(*(client.get(r.url + "/metrics", headers=auth) for r in router.live()),
                                     return_exceptions=True)
        summed = sum_metrics([t.text for t in texts if isinstance(t, httpx.Response) and t.status_code == 200])
        return Response(summed + generate_latest(router.registry).decode(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def sum_metrics(texts: list[str]) -> str:
    """The replicas' Prometheus texts as one: every sample summed over replicas by name and labels."""
    families: dict[str, tuple] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            name, (typ, doc, samples) = fam.name, families.setdefault(fam.name, (fam.type, fam.documentation, {}))
            for s in fam.samples:
                if s.name.endswith("_created"):  # a timestamp, not an amount
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                samples[key] = samples.get(key, 0.0) + s.value
    out = []
    for name, (typ, doc, samples) in families.items():
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {typ}\n")
        for (sname, labels), v in samples.items():
            lab = ",".join(f'{k}="{val}"' for k, val in labels)
            out.append(f"{sname}{{{lab}}} {v!r}\n" if lab else f"{sname} {v!r}\n")
    return "".join(out)


# ---------------------------------------------------------------- starting the replicas

def start_replicas(n: int, replica_argv: list[str], ports: list[int], env: dict) -> tuple[list[Replica], str]:
    """N `gpt-engine serve` processes on loopback ports, each with the key returned -> (replicas, key)."""
    key = secrets.token_urlsafe(24)
    reps = []
    for i, port in enumerate(ports[:n]):
        proc = subprocess.Popen([sys.executable, "-m", "gpt_engine", "serve", *replica_argv, "--host", "127.0.0.1",
                                 "--port", str(port), "--api-key", key], env=env)
        reps.append(Replica(i, f"http://127.0.0.1:{port}", proc))
    return reps, key


def wait_ready(replicas: list[Replica], timeout: float) -> None:
    """Until every replica answers /health (RuntimeError naming one that exits or does not come up)."""
    deadline = time.monotonic() + timeout
    pending = list(replicas)
    while pending:
        rep = pending[0]
        if rep.proc.poll() is not None:
            raise RuntimeError(f"engine replica {rep.index} exited with code {rep.proc.returncode} while starting")
        try:
            if httpx.get(rep.url + "/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine replica {rep.index} did not come up in {timeout:g} s")
        time.sleep(0.2)
