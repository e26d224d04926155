"""The API-key check (only the exact key passes, on every protected endpoint, streams included)
and the mapping of engine refusals to 4xx: a request the server's own checks let through but the
engine refuses (longer than a small KV pool can ever hold) gets a 400 in OpenAI's error body."""
from __future__ import annotations

import httpx
import pytest

from gpt_engine.async_llm import AsyncLLM
from gpt_engine.llm import LLM
from gpt_engine.cli.serve import build_app
from tests.test_server import KEY, ServerThread, model_dir, srv  # noqa: F401 (fixtures)

CHAT = [{"role": "user", "content": "hi"}]
ERROR_FIELDS = {"message", "type", "param", "code"}

# (method, path, json body or None): every route behind the key, streaming ones included
PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/{model}", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1, "stream": True}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, "stream": True}),
]
PROTECTED_IDS = ["models", "model", "completions", "completions-stream", "chat", "chat-stream"]

# Authorization values that must be refused (None: no header at all)
REFUSED = [
    None,
    "",
    "Bearer",                      # the scheme with no key (what "Bearer " arrives as: OWS is trimmed)
    f"Bearer {KEY[:-1]}",          # a truncated key: a prefix comparison would pass it
    f"Bearer {KEY[:1]}",
    f"Bearer {KEY}x",              # the key plus extra characters
    f"Bearer {KEY} x",
    f"Bearer x{KEY}",
    f"Bearer {KEY.upper()}",       # the key itself is case-sensitive
    f"Bearer{KEY}",                # no space after the scheme
    KEY,                           # no scheme
    f"Basic {KEY}",                # another scheme
    f"Token {KEY}",
    f"bearer {KEY[:-1]}",          # lower/upper-case scheme with a wrong key
    f"BEARER {KEY}x",
    f"bearer {KEY}{KEY}",
]
# RFC 7235 2.1: the auth scheme is case-insensitive; RFC 6750 allows 1*SP before the token
ACCEPTED = [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"]


def _send(srv, method, path, body, authorization):  # noqa: F811 (srv: the fixture's value)
    headers = {} if authorization is None else {"Authorization": authorization}
    url = srv.url + path.format(model=srv.engine.model_name)
    with httpx.Client(timeout=60) as c:
        r = c.request(method, url, json=body, headers=headers)
        r.read()
    return r


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=PROTECTED_IDS)
def test_only_the_exact_key_passes(srv, method, path, body):  # noqa: F811
    for authorization in REFUSED:
        r = _send(srv, method, path, body, authorization)
        assert r.status_code == 401, (authorization, r.status_code, r.text)
        assert r.headers.get("www-authenticate") == "Bearer"
        assert r.headers["content-type"].startswith("application/json"), (authorization, r.headers)
        err = r.json()["error"]
        assert set(err) == ERROR_FIELDS and err["code"] == "invalid_api_key", err
        assert KEY not in r.text  # the key is never echoed
    for authorization in ACCEPTED:
        r = _send(srv, method, path, body, authorization)
        assert r.status_code == 200, (authorization, r.status_code, r.text)
        if body and body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text


def test_v1_root_is_protected(srv):  # noqa: F811
    r = httpx.get(srv.url + "/v1", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(srv.url + "/v1", headers={"Authorization": "Bearer"}, timeout=30)
    assert r.status_code == 401


# ---------------------------------------------------------------- engine refusals -> 400

POOL_BLOCKS, BLOCK = 4, 16   # 64 tokens of KV: far less than the model's 128-token context


@pytest.fixture(scope="module")
def small_pool(torch_path, model_dir):  # noqa: F811
    engine = AsyncLLM(LLM(str(model_dir), device="cpu", num_kv_blocks=POOL_BLOCKS, block_size=BLOCK))
    assert engine.max_model_len == POOL_BLOCKS * BLOCK  # clamped: the model's own context is 128
    server = ServerThread(build_app(engine, api_key=KEY, chat_template=engine.llm.chat_template))
    with server:
        server.engine = engine
        yield server


def _too_big(path, stream):
    # beyond what the KV pool can ever hold (the engine's context, clamped to the pool)
    n = POOL_BLOCKS * BLOCK + 16
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    return {**body, "max_tokens": n, "ignore_eos": True, "stream": stream}


def _engine_idle(server):
    s = server.call(server.engine.stats)
    return s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_engine_refusal_is_400(small_pool, path, stream):
    # a stream too: the engine's checks run before its 200 starts
    with httpx.stream("POST", small_pool.url + path, json=_too_big(path, stream),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        r.read()
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == ERROR_FIELDS and err["type"] == "invalid_request_error", err
    assert "maximum context length is 64" in err["message"] and err["code"] == "context_length_exceeded", err
    assert _engine_idle(small_pool)
    # the engine still serves what fits
    r = httpx.post(small_pool.url + path, json={**_too_big(path, False), "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(small_pool.url + "/health", timeout=30).status_code == 200
