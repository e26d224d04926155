"""The OpenAI-compatible server, driven by the official `openai` client (and httpx for bodies
that client would refuse to send) against uvicorn in a thread on 127.0.0.1 with a small
random-init model. All traffic stays on loopback; every wait is bounded."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from gpt_engine.cli.serve import ChatTemplate, add_args
# CORPUS and ServerThread: test_abuse and test_auth_errors import them from here
from tests.helpers import (CORPUS, ServerThread, make_chat_model, serving, slow_engine_steps,  # noqa: F401
                           wait_healthy, wait_pool_empty)

KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def srv(torch_path, model_dir):
    with serving(model_dir, api_key=KEY) as server:
        yield server


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------- happy paths

def test_models(client, srv):
    ids = [m.id for m in client.models.list().data]
    assert ids == [srv.engine.model_name]
    assert client.models.retrieve(ids[0]).id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_and_stream_agree(client, srv):
    prompt = "the quick brown fox"
    args = dict(model=srv.engine.model_name, prompt=prompt, max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})
    r = client.completions.create(**args)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    n_prompt = len(srv.engine.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_stream_agree(client, srv, model_dir):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello server"}]
    args = dict(model=srv.engine.model_name, messages=msgs, max_completion_tokens=10, temperature=0,
                extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**args)
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.usage.completion_tokens == 10
    # the model directory's jinja template was used
    rendered = srv.engine.llm.chat_template.render(msgs)
    assert rendered == "<|endoftext|>[system] be brief\n[user] hello server\n[assistant] "
    assert r.usage.prompt_tokens == len(srv.engine.tokenizer.encode(rendered))
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_no_chat_template_is_a_clear_400(model_dir):
    # no format is guessed for a model without a template: chat requests are refused, completions served
    with serving(model_dir, template=False, max_num_seqs=4) as server:
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    with pytest.raises(ValueError, match="jinja"):
        ChatTemplate("")


def test_batch_prompts_n_echo_and_token_ids(client, srv):
    tok = srv.engine.tokenizer
    ids = tok.encode("hello world")
    r = client.completions.create(model=srv.engine.model_name, prompt=["hello world", "def f(x):"], n=2,
                                  max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples agree
    assert r.usage.prompt_tokens == len(ids) + len(tok.encode("def f(x):"))
    assert r.usage.completion_tokens == 20
    by_ids = client.completions.create(model=srv.engine.model_name, prompt=ids, max_tokens=5, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == "hello world" + r.choices[0].text


def test_logprobs(client, srv):
    r = client.completions.create(model=srv.engine.model_name, prompt="hello", max_tokens=4, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(top.values()) - x) < 1e-4 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(model=srv.engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_sampling_options(client, srv):
    model = srv.engine.model_name
    args = dict(model=model, prompt="hello world", max_tokens=8, temperature=1.0, top_p=0.9,
                extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a = client.completions.create(seed=7, presence_penalty=0.5, frequency_penalty=0.5, **args)
    b = client.completions.create(seed=7, presence_penalty=0.5, frequency_penalty=0.5, **args)
    assert a.choices[0].text == b.choices[0].text  # a seed makes sampling repeatable
    # a stop string cuts the output before it and reports "stop"
    full = client.completions.create(model=model, prompt="the", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if stop.strip():
        r = client.completions.create(model=model, prompt="the", max_tokens=16, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == full[:full.index(stop)]


# ---------------------------------------------------------------- errors: 4xx, never 500 nor a hang

BAD_COMPLETIONS = [
    ("{", "JSON"),
    ('{"prompt": "x", "temperature": "hot"}', "temperature"),
    ('{"prompt": "x", "temperature": 5}', "temperature"),
    ('{"prompt": "x", "top_p": 0}', "top_p"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": "many"}', "max_tokens"),
    ('{"prompt": "x", "n": 0}', "n"),
    ('{"prompt": "x", "n": 100000}', "n"),
    ('{"prompt": ["x", "y", "z"], "n": 100}', "sequences"),
    ('{"prompt": "x", "logprobs": 99}', "logprobs"),
    ('{"prompt": "x", "echo": true, "logprobs": 1, "prompt_logprobs": -1}', "prompt_logprobs"),
    ('{"prompt": "x", "prompt_logprobs": 21}', "prompt_logprobs"),
    ('{"prompt": "x", "stop": 3}', "stop"),
    ('{"prompt": ""}', "empty"),
    ('{"prompt": []}', "empty"),
    ('{"prompt": [1, "a"]}', "prompt"),
    ('{"prompt": [99999999]}', "out of range"),
    ('{"max_tokens": 3}', "prompt"),
    ('[1, 2]', "body"),
    ('{"prompt": "x", "max_tokens": 100000}', "maximum context length"),
    ('{"prompt": "x", "seed": 1e30}', "seed"),
    ('{"prompt": "x", "top_k": 100000000000000000000}', "top_k"),  # over int64: it killed the engine loop
    ('{"prompt": "a\\ud800", "max_tokens": 2}', "unicode"),  # a lone surrogate: the tokenizer raised TypeError
    ('{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "unicode"),
]


@pytest.mark.parametrize("body,word", BAD_COMPLETIONS)
def test_bad_completion_requests(srv, body, word):
    r = httpx.post(srv.url + "/v1/completions", content=body, timeout=30,
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and word.lower() in err["message"].lower(), err
    assert set(err) == {"message", "type", "param", "code"}


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 100000}, "maximum context length"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 5}}, "logit_bias"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 2**64}, "top_k"),
]


@pytest.mark.parametrize("body,word", BAD_CHATS)
def test_bad_chat_requests(srv, body, word):
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 400, r.text
    assert word in r.json()["error"]["message"], r.text


# JSON's "\ud800" escape decodes to a lone surrogate, which UTF-8 cannot encode: the error
# body (echoing it) and the tokenizer failed with a 500. Raw bodies: httpx's json= refuses to send one.
SURROGATES = [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', 400,
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     400, "messages"),
    ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', 404, "model"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "model": "a\\udfffb"}', 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", SURROGATES)
def test_lone_surrogates(srv, path, body, status, param):
    r = httpx.post(srv.url + path, content=body, timeout=30, headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    if status == 404:  # the name is shown escaped
        assert "\\ud800" in err["message"] or "\\udfff" in err["message"], err


def test_method_not_allowed_sends_allow(srv):
    r = httpx.put(srv.url + "/v1/completions", headers=auth(), timeout=30)
    assert r.status_code == 405 and r.headers.get("allow") == "POST", (r.headers, r.text)
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_the_errors_it_sends(srv):
    # validation failures answer 400 (not FastAPI's default 422) in OpenAI's error body
    r = httpx.post(srv.url + "/v1/completions", headers=auth(), json={"prompt": "hi", "n": 0}, timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    schema = httpx.get(srv.url + "/openapi.json", headers=auth(), timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "400", "401", "404", "503"} <= set(responses), responses
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    err = schema["components"]["schemas"]["ErrorDetail"]
    assert set(err["required"]) == {"message", "type"} and "HTTPValidationError" not in schema["components"]["schemas"]


def test_context_error_names_lengths(client, srv):
    n = srv.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=srv.engine.model_name, prompt=[5] * (n - 4), max_tokens=10)
    assert str(n) in str(e.value) and str(n - 4) in str(e.value) and "10" in str(e.value)


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_api_key_required(srv):
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    # health and metrics stay open
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
    assert httpx.get(srv.url + "/metrics", timeout=30).status_code == 200


# ---------------------------------------------------------------- load, disconnects, metrics

def test_many_concurrent_streams(srv):
    n_req, max_tokens = 120, 8

    async def main():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i):
            stream = await client.completions.create(
                model=srv.engine.model_name, prompt=f"request {i}: hello", max_tokens=max_tokens, temperature=0.8,
                seed=i, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                usage = chunk.usage or usage
            return text, usage
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n_req))), 150)
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == n_req
    assert all(u.completion_tokens == max_tokens for _, u in results)
    wait_pool_empty(srv)


@pytest.fixture
def slow_steps(srv):
    """Engine steps of >= 20 ms, counted: a request of 100 tokens then takes >= 2 s, so one
    that ends after a handful of steps was aborted, not run to the end."""
    with slow_engine_steps(srv) as calls:
        yield calls


def test_disconnect_mid_stream_frees_kv(srv, slow_steps):
    body = {"prompt": "hello", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        # closed after one chunk: the request must be aborted, not run to 100 tokens
    wait_pool_empty(srv)
    assert len(slow_steps) < 50


def test_disconnect_non_streaming_frees_kv(srv, slow_steps):
    body = json.dumps({"prompt": "hello", "max_tokens": 100, "ignore_eos": True}).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.time() + 10
        while not slow_steps:  # the request is running
            assert time.time() < deadline
            time.sleep(0.01)
    wait_pool_empty(srv)
    assert len(slow_steps) < 50


def test_metrics(srv, client):
    client.completions.create(model=srv.engine.model_name, prompt="hi", max_tokens=3, stream=False)
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    for name in ("gpt_engine_requests_total", "gpt_engine_prompt_tokens_total", "gpt_engine_generation_tokens_total",
                 "gpt_engine_time_to_first_token_seconds_bucket", "gpt_engine_inter_token_latency_seconds_bucket",
                 "gpt_engine_num_requests_running", "gpt_engine_num_requests_waiting",
                 "gpt_engine_kv_cache_usage_perc"):
        assert name in text, name
    assert 'endpoint="/v1/completions",status="200"' in text


# ---------------------------------------------------------------- no key, dead engine, CLI

def test_no_key_and_dead_engine(torch_path, model_dir):
    with serving(model_dir) as server:
        url, engine = server.url, server.engine
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 200  # no key needed
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        step, calls = engine.llm.step, itertools.count()

        def dying_step():  # the engine loop dies a few steps into the request
            if next(calls) == 5:
                raise RuntimeError("boom")
            return step()
        engine.llm.step = dying_step
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "hi", "max_tokens": 100, "stream": True, "ignore_eos": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and "boom" in json.loads(lines[-1][6:])["error"]["message"]
        assert httpx.get(url + "/health", timeout=30).status_code == 503
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_cli_args(monkeypatch):
    import argparse
    monkeypatch.setenv("GPT_ENGINE_API_KEY", "from-env")
    p = argparse.ArgumentParser()
    add_args(p)
    a = p.parse_args(["some/model"])
    assert (a.host, a.port, a.api_key) == ("127.0.0.1", 8000, "from-env")
    a = p.parse_args(["m", "--api-key", "k", "--max-num-seqs", "4", "--device", "cpu", "--dtype", "float32"])
    assert (a.api_key, a.max_num_seqs, a.device, a.dtype) == ("k", 4, "cpu", "float32")


def test_serve_command_and_sigterm(model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPT_ENGINE_API_KEY": KEY}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gpt_engine", "serve", str(model_dir), "--port", str(port),
                             "--device", "cpu", "--log-level", "info"], env=env, stdout=log, stderr=log)
    try:
        url = wait_healthy(proc, port)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=4,
                                      messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content is not None
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (lifespan stops the engine), then re-raises the signal
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
