"""The request surface real OpenAI/vLLM clients send: unknown and unimplemented fields are 400s
naming them, the no-op ones are accepted; logit_bias, min_tokens, cached_tokens, /tokenize and
/detokenize, --served-model-name and the engine's Prometheus counters. Same set-up as
test_server: uvicorn in a thread on loopback, a small random-init model."""
from __future__ import annotations

import re

import httpx
import openai
import pytest

from gpt_engine.async_llm import AsyncLLM
from gpt_engine.cli.serve import build_app
from gpt_engine.llm import LLM
from tests.test_server import KEY, ServerThread, client, model_dir, srv  # noqa: F401 (fixtures)

CHAT = [{"role": "user", "content": "hello there"}]
PROMPT = [11, 42, 7, 99, 23, 5, 61, 8]   # token ids: no tokenizer round trip in the way


def _post(server, path, body):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _error(r, status=400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def _greedy(server, prompt, n, **fields):
    """The engine's own greedy ids (and raw top-2 logprobs) for prompt, outside HTTP."""
    async def run():
        req = server.engine.prepare(prompt, {"temperature": 0, "max_tokens": n, "logprobs": 2, **fields})
        async for out in server.engine.generate(req):
            if out.finished:
                return out
    return server.call(run)


# ---------------------------------------------------------------- fields

@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"messages": CHAT, "temprature": 0.5}, "temprature"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {}}, "chat_template_kwargs"),
    ("/v1/completions", {"prompt": "hi", "metadata": {"a": "b"}}, "metadata"),  # a chat-only field
])
def test_unknown_field_is_400_naming_it(srv, path, body, field):
    err = _error(_post(srv, path, {**body, "max_tokens": 1}))
    assert err["message"] == f"Unrecognized request argument supplied: {field}" and err["param"] == field, err


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": CHAT, "modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"messages": CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": CHAT, "prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_unimplemented_openai_field_is_400_naming_it(srv, path, body, field):
    err = _error(_post(srv, path, {**body, "max_tokens": 1}))
    assert err["param"] == field and f"{field} is not supported" in err["message"], err


def test_no_op_openai_fields_are_accepted_and_change_nothing(srv):
    base = {"messages": CHAT, "max_tokens": 6, "temperature": 0}
    plain = _post(srv, "/v1/chat/completions", base)
    assert plain.status_code == 200, plain.text
    noop = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "safety_identifier": "s",
            "prompt_cache_key": "k", "parallel_tool_calls": True, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "modalities": ["text"]}
    r = _post(srv, "/v1/chat/completions", {**base, **noop})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    r = _post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "user": "u1", "best_of": 1,
                                       "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- logit_bias, min_tokens

@pytest.mark.parametrize("bias,word", [({"99999": 5}, "out of range"), ({"5": 101}, "[-100, 100]"),
                                       ({"five": 1}, "token ids"), ({"-3": 1}, "token ids")])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_logit_bias_is_400_naming_it(srv, path, bias, word):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    err = _error(_post(srv, path, {**body, "max_tokens": 1, "logit_bias": bias}))
    assert err["param"] == "logit_bias" and word in err["message"], err


def test_logit_bias_bans_and_forces(srv, client):
    tok = srv.engine.tokenizer
    plain = _greedy(srv, PROMPT, 3, ignore_eos=True)
    t0 = plain.token_ids[0]
    second = sorted(plain.logprobs[0].items(), key=lambda kv: -kv[1])[1][0]
    # -100 on greedy's pick: the next best comes instead
    banned = _greedy(srv, PROMPT, 1, ignore_eos=True, logit_bias={str(t0): -100})
    assert banned.token_ids[0] == second != t0
    r = client.completions.create(model=srv.engine.model_name, prompt=PROMPT, max_tokens=1, temperature=0,
                                  logit_bias={str(t0): -100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(banned.token_ids)
    # +100 on a token greedy would not pick: it is every token
    k = next(t for t in (tok.encode(c)[0] for c in "eaoi") if t not in plain.token_ids)
    r = client.completions.create(model=srv.engine.model_name, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logit_bias={str(k): 100})
    assert r.choices[0].text == tok.decode([k] * 3) and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=srv.engine.model_name, messages=CHAT, max_tokens=3, temperature=0,
                                       logit_bias={str(k): 100})
    assert r.choices[0].message.content == tok.decode([k] * 3)


def test_min_tokens_holds_back_eos_and_stop_ids(srv, client):
    eos = next(iter(srv.engine.llm.eos_token_ids))
    k = srv.engine.tokenizer.encode("e")[0]

    def run(**kw):
        r = client.completions.create(model=srv.engine.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                      **kw)
        return r.choices[0].finish_reason, r.usage.completion_tokens
    # EOS forced: it ends the answer at once, unless min_tokens holds it back that long
    assert run(logit_bias={str(eos): 100}) == ("stop", 1)
    assert run(logit_bias={str(eos): 100}, extra_body={"min_tokens": 4}) == ("stop", 5)
    # ... banned by the sampler until then (not drawn and passed over): the first four are other tokens
    out = _greedy(srv, PROMPT, 10, logit_bias={str(eos): 100}, min_tokens=4)
    assert eos not in out.token_ids[:4] and out.token_ids[4:] == [eos], out.token_ids
    # a stop token id likewise
    assert run(logit_bias={str(k): 100}, extra_body={"stop_token_ids": [k], "min_tokens": 2}) == ("stop", 3)
    # streamed, sampled: the same rule
    chunks = list(client.completions.create(model=srv.engine.model_name, prompt=PROMPT, max_tokens=10, seed=1,
                                            logit_bias={str(eos): 100}, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"min_tokens": 6}))
    assert chunks[-1].usage.completion_tokens == 7
    err = _error(_post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}))
    assert err["param"] == "min_tokens", err


# ---------------------------------------------------------------- cached tokens

def test_cached_tokens_reported_on_a_repeated_prompt(srv, client):
    prompt = [(i * 37 + 3) % 300 + 1 for i in range(50)]   # 50 ids no other test sends: 3 full blocks of 16
    model = srv.engine.model_name

    def cached(r):
        return r.usage.prompt_tokens_details.cached_tokens
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert cached(first) == 0
    again = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert cached(again) == 48 and again.usage.prompt_tokens == 50
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert cached(chunks[-1]) == 48
    msgs = [{"role": "user", "content": "tell me about the lazy dog and the quick brown fox " * 3}]
    client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert 16 <= cached(chat) < chat.usage.prompt_tokens


# ---------------------------------------------------------------- /tokenize, /detokenize

def test_tokenize_detokenize_round_trip(srv):
    tok = srv.engine.tokenizer
    r = _post(srv, "/tokenize", {"prompt": "hello world", "model": srv.engine.model_name})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("hello world", add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == srv.engine.max_model_len
    bare = _post(srv, "/tokenize", {"prompt": "hello world", "add_special_tokens": False,
                                    "return_token_strs": True}).json()
    assert bare["tokens"] == tok.encode("hello world") and len(bare["token_strs"]) == bare["count"]
    r = _post(srv, "/detokenize", {"tokens": bare["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "hello world"}, r.text
    assert _post(srv, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    # chat: the template's rendering, with the generation prompt unless told otherwise
    template = srv.engine.llm.chat_template
    chat = _post(srv, "/tokenize", {"messages": CHAT}).json()
    assert chat["tokens"] == tok.encode(template.render(CHAT, True))
    plain = _post(srv, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    assert plain["tokens"] == tok.encode(template.render(CHAT, False)) and plain["count"] < chat["count"]


@pytest.mark.parametrize("path,body,param,word", [
    ("/detokenize", {"tokens": [5, 99999]}, "tokens", "99999"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "out of range"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0", "integer"),
    ("/tokenize", {}, None, "either prompt or messages"),
    ("/tokenize", {"prompt": "x", "messages": CHAT}, None, "either prompt or messages"),
    ("/tokenize", {"prompt": "x", "extra": 1}, "extra", "Unrecognized request argument"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "role"),
])
def test_tokenize_errors(srv, path, body, param, word):
    err = _error(_post(srv, path, body))
    assert err["param"] == param and word in err["message"], err


def test_tokenize_needs_the_key_and_a_served_model(srv):
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "x"}, timeout=30)
    assert _error(r, 401)["code"] == "invalid_api_key"
    assert _error(_post(srv, "/detokenize", {"tokens": [1], "model": "nope"}), 404)["code"] == "model_not_found"


# ---------------------------------------------------------------- served names, metrics

NAMES = ["alpha", "beta"]


@pytest.fixture(scope="module")
def small(torch_path, model_dir):  # noqa: F811
    """Served as alpha and beta, over a KV pool of 6 blocks of 16: a few sequences preempt each other."""
    engine = AsyncLLM(LLM(str(model_dir), device="cpu", num_kv_blocks=6, block_size=16))
    with ServerThread(build_app(engine, api_key=KEY, chat_template=engine.llm.chat_template,
                                served_model_names=NAMES)) as server:
        server.engine = engine
        yield server


def test_served_model_names(small):
    client = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == NAMES
    assert client.models.retrieve("beta").id == "beta"
    r = client.completions.create(model="beta", prompt=PROMPT, max_tokens=1)
    assert r.model == "alpha"   # responses carry the first name, as vLLM's do
    for wrong in ("nope", small.engine.model_name):   # the directory's name is not served under its own name
        err = _error(_post(small, "/v1/completions", {"model": wrong, "prompt": "hi", "max_tokens": 1}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model" and wrong in err["message"], err
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(wrong)


def test_serve_flag_takes_several_names():
    import argparse
    p = argparse.ArgumentParser()
    from gpt_engine.cli.serve import add_args
    add_args(p)
    assert p.parse_args(["dir", "--served-model-name", "a", "b"]).served_model_name == ["a", "b"]
    assert p.parse_args(["dir"]).served_model_name is None


def _counters(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    names = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
    return {n: float(re.search(rf"^gpt_engine_{n}_total (\S+)$", text, re.M).group(1)) for n in names}


def test_metrics_count_prefix_cache_and_preemptions(small):
    before = _counters(small)
    prompt = [(i * 13 + 1) % 300 + 1 for i in range(40)]
    for _ in range(2):
        assert _post(small, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).status_code == 200
    mid = _counters(small)
    assert mid["prefix_cache_queries"] - before["prefix_cache_queries"] >= 80
    assert mid["prefix_cache_hits"] - before["prefix_cache_hits"] >= 32
    # four sequences of 20 + 30 tokens in 6 blocks: they cannot all hold their blocks at once
    prompts = [[(i * 7 + j * 31) % 300 + 1 for i in range(20)] for j in range(4)]
    r = _post(small, "/v1/completions", {"prompt": prompts, "max_tokens": 30, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert _counters(small)["num_preemptions"] > mid["num_preemptions"]
