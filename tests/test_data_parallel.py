"""Data-parallel serving (api/router.py, `gpt-engine serve --data-parallel-size N`): requests sharing a prompt
prefix go to one replica (whose prefix cache then serves it), others spread by load; /metrics sums the
replicas; a replica that dies leaves routing and the others keep serving; the API key is the front's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from gpt_engine.api.router import Replica, Router, prefix_keys, request_text, sum_metrics
from tests.helpers import make_chat_model, wait_healthy

LONG = "Hello there, this is a long shared prefix that goes to the same replica every time we ask it. "


def _router(n=2):
    return Router([Replica(i, f"http://replica{i}") for i in range(n)], "k")


def test_router_keeps_a_prefix_on_its_replica_and_spreads_the_rest():
    r = _router()
    first = r.pick(LONG + "one")
    assert r.pick(LONG + "two") is first and r.pick(LONG + "three") is first  # the shared prefix's replica
    other = r.pick("something else entirely, with nothing in common " * 3)
    assert other is not first  # a new prefix: the replica routed to least
    # past BALANCE more requests in flight than the least loaded, affinity gives way to load
    first.inflight = 10
    assert r.pick(LONG + "four") is other
    r.drop(other, "test")
    assert r.pick("anything") is first and r.live() == [first]


def test_request_text_and_prefix_keys():
    assert request_text({"messages": [{"role": "user", "content": "hi"}]}) == "user:hi\n"
    assert request_text({"prompt": ["a", "b"]}) == "a" and request_text({"prompt": [1, 2]}) == "[1, 2]"
    keys = prefix_keys("x" * 200)
    assert len(keys) == 3 and prefix_keys("x" * 200 + "y")[:3] == keys


def test_sum_metrics_adds_samples_by_name_and_labels():
    a = "# HELP t Tokens\n# TYPE t counter\nt_total 3.0\n# TYPE r counter\nr_total{endpoint=\"/x\"} 1.0\n"
    b = "# HELP t Tokens\n# TYPE t counter\nt_total 4.0\n# TYPE r counter\nr_total{endpoint=\"/x\"} 2.0\n" \
        "r_total{endpoint=\"/y\"} 5.0\n"
    out = sum_metrics([a, b])
    assert "t_total 7.0" in out and 'r_total{endpoint="/x"} 3.0' in out and 'r_total{endpoint="/y"} 5.0' in out


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    model = make_chat_model(tmp_path_factory.mktemp("dp"))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gpt_engine", "serve", str(model), "--device", "cpu",
                             "--port", str(port), "--data-parallel-size", "2", "--api-key", "front-key",
                             "--max-num-seqs", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc, wait_healthy(proc, port, timeout=300), model.name
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _complete(url, model, prompt, key="front-key"):
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _metric(url, name) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name)}


def test_served_routed_summed_and_a_dead_replica_left_out(dp_server):
    proc, url, model = dp_server
    assert _complete(url, model, LONG, key="wrong").status_code == 401
    outs = [_complete(url, model, LONG + str(i)) for i in range(3)] + [_complete(url, model, "Other " * 30)]
    assert all(r.status_code == 200 for r in outs)
    routed = _metric(url, "gpt_engine_router_requests_total")
    assert sum(routed.values()) == 4 and routed['gpt_engine_router_requests_total{reason="prefix",replica="0"}'] == 2
    assert sum(v for k, v in routed.items() if 'replica="1"' in k) == 1  # the other prefix, on the other replica
    # the replicas' series summed: every token each returned, and the shared prefix's cache hits
    gen = _metric(url, "gpt_engine_generation_tokens_total")["gpt_engine_generation_tokens_total"]
    assert gen == sum(r.json()["usage"]["completion_tokens"] for r in outs)
    assert _metric(url, "gpt_engine_prefix_cache_hits_total")["gpt_engine_prefix_cache_hits_total"] > 0

    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        replicas = [int(c) for c in f.read().split()]
    os.kill(replicas[0], signal.SIGKILL)
    for _ in range(50):
        health = httpx.get(url + "/health", timeout=10).json()
        if not all(r["alive"] for r in health["replicas"]):
            break
        __import__("time").sleep(0.1)
    assert [r["alive"] for r in health["replicas"]].count(False) == 1
    assert all(_complete(url, model, LONG + p).status_code == 200 for p in ("a", "b"))  # the other serves
