"""Structured outputs (core/structured.py, llguidance): a tiny random-init model constrained by a JSON
schema, a regex, a choice list and a grammar, offline and through the server (OpenAI's response_format,
the SDK's .parse(), vLLM's structured_outputs), under n > 1, streaming, stop strings, seeds, preemption
and chunked prefill; padded vocab rows are never drawn."""
from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
import torch

from gpt_engine import LLM, SamplingParams, StructuredOutputsParams
from gpt_engine.core.request import RequestError
from gpt_engine.worker.sampler import apply_grammar_bitmask
from tests.helpers import CORPUS, make_chat_model, serving

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 4},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                   "level": {"enum": [1, 2, 3]}},
                  "required": ["ok", "level"], "additionalProperties": False},
    },
    "required": ["color", "name", "size", "tags", "inner"],
    "additionalProperties": False,
}
PROMPTS = ["Hello", "The cat sat", "x = 1", "def f():"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vocab 384 over a 320-token tokenizer: rows 320.. are padding; a long context for generous max_tokens
    return make_chat_model(tmp_path_factory.mktemp("so-model"), n_positions=512)


@pytest.fixture(scope="module")
def llm(torch_path, model_dir):
    return LLM(str(model_dir), device="cpu")


def _json_sp(**kw):
    return SamplingParams(**{"max_tokens": 300, "temperature": 1.0, **kw},
                          structured_outputs=StructuredOutputsParams(json=SCHEMA))


# ---------------------------------------------------------------- offline

def test_json_schema_outputs_validate_and_terminate(llm):
    """Sampled at temperature 1 from a random model: every output is valid and the grammar ends it."""
    outs = llm.generate(PROMPTS * 3, [_json_sp(seed=s) for s in range(12)], use_tqdm=False)
    for o in outs:
        assert o.finish_reason == "stop", (o.finish_reason, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMA)
        assert o.token_ids[-1] in llm.eos_token_ids   # it ended where the grammar may end: on EOS
        assert "\n" not in o.text and ": " not in o.text.replace('": "', "")  # compact
    assert llm.grammars.num_compiled == 1   # one schema, compiled once
    assert llm.num_constrained == 0 and not llm.requests


def test_schema_as_text_and_greedy(llm):
    sp = SamplingParams(max_tokens=300, temperature=0, structured_outputs=StructuredOutputsParams(
        json=json.dumps(SCHEMA)))
    (o,) = llm.generate("Hello", sp, use_tqdm=False)
    assert o.finish_reason == "stop"
    jsonschema.validate(json.loads(o.text), SCHEMA)


def test_prefix_cache_keeps_constrained_outputs(torch_path, model_dir):
    """A long shared prompt served again from the prefix cache: the constrained greedy output is the one
    computed without the cache (the matcher starts at the output, whatever the prompt's blocks)."""
    prompt = CORPUS[:600]
    sp = SamplingParams(max_tokens=300, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    cold = LLM(str(model_dir), device="cpu", enable_prefix_caching=False).generate(prompt, sp, use_tqdm=False)[0]
    warm = LLM(str(model_dir), device="cpu", enable_prefix_caching=True)
    first = warm.generate(prompt, sp, use_tqdm=False)[0]
    again = warm.generate(prompt, sp, use_tqdm=False)[0]
    assert warm.stats()["prefix_cache_hit_tokens"] > 0
    assert cold.text == first.text == again.text and again.finish_reason == "stop"
    jsonschema.validate(json.loads(again.text), SCHEMA)


def test_regex_choice_and_grammar(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=50, temperature=1.0, seed=3,
                                                structured_outputs={"regex": r"[0-9]{3}-[a-z]{2,4}"}),
                        use_tqdm=False)
    assert all(o.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", o.text) for o in outs), \
        [o.text for o in outs]
    choices = ["yes", "no", "a (b) | c*"]
    outs = llm.generate(PROMPTS * 2, [SamplingParams(max_tokens=50, seed=s, structured_outputs=StructuredOutputsParams(
        choice=choices)) for s in range(8)], use_tqdm=False)
    assert all(o.finish_reason == "stop" and o.text in choices for o in outs), [o.text for o in outs]
    lark = 'start: greeting " " name "!"\ngreeting: "hi" | "hello"\nname: /[a-z]{1,5}/\n'
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=50, seed=1, structured_outputs=StructuredOutputsParams(
        grammar=lark)), use_tqdm=False)
    assert all(o.finish_reason == "stop" and re.fullmatch(r"(hi|hello) [a-z]{1,5}!", o.text) for o in outs), \
        [o.text for o in outs]


def test_padded_vocab_rows_never_sampled(llm):
    """The model's rows past the tokenizer's vocabulary are never allowed, whatever the logits say."""
    assert llm.vocab_size > llm.tokenizer._tok.get_vocab_size()
    pad = llm.vocab_size - 1
    bias = {pad: 100.0}
    (free,) = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, logit_bias=bias), use_tqdm=False)
    assert free.token_ids[0] == pad   # the bias alone would draw it
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=300, seed=s, logit_bias=bias, structured_outputs=
                                                 StructuredOutputsParams(json=SCHEMA)) for s in range(4)],
                        use_tqdm=False)
    vocab = llm.tokenizer._tok.get_vocab_size()
    for o in outs:
        assert max(o.token_ids) < vocab and o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_apply_grammar_bitmask_rows_and_tail():
    import numpy as np
    logits = torch.zeros(3, 70)
    mask = np.zeros((1, 2), dtype=np.int32)   # 64 bits: ids 64..69 lie past the mask
    mask[0, 0] = 1 << 5
    mask[0, 1] = np.int32(-(1 << 31))          # bit 31 of word 1: id 63
    apply_grammar_bitmask(logits, [1], mask)
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [5, 63]
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()


@pytest.mark.parametrize("V, W", [(70, 3), (100, 3), (64, 2), (1, 1)])
def test_token_bitmask_kernel_matches_reference(V, W):
    """kernels.apply_token_bitmask_ (C++ on CPU float32) against its twin: whole words allowed, refused and
    mixed, rows in any order, a vocabulary past the mask's words (V 100 > 96) and inside them."""
    from gpt_engine.kernels import apply_token_bitmask_
    from gpt_engine.kernels import reference as R
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(5, V, generator=g)
    words = torch.randint(-2**31, 2**31 - 1, (3, W), generator=g, dtype=torch.int64).to(torch.int32)
    words[0, 0], words[1, -1] = -1, 0
    rows = torch.tensor([3, 0, 4])
    got = apply_token_bitmask_(logits.clone(), rows, words)
    assert torch.equal(got, R.apply_token_bitmask_(logits.clone(), rows, words))
    assert torch.equal(got[[1, 2]], logits[[1, 2]])  # rows without a mask untouched
    with pytest.raises(ValueError, match="repeated"):
        apply_token_bitmask_(logits.clone(), torch.tensor([3, 3, 0]), words)
    with pytest.raises(TypeError, match="int32"):
        apply_token_bitmask_(logits.clone(), rows, words.long())


def test_preemption_and_chunked_prefill_keep_outputs(torch_path, model_dir):
    """Greedy constrained outputs are the same when run alone, in a batch that preempts (a KV pool too
    small for all) and with prompts prefilled in chunks."""
    prompts = [p * 6 for p in PROMPTS] * 2
    sp = SamplingParams(max_tokens=300, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    alone = LLM(str(model_dir), device="cpu")
    ref = [alone.generate(p, sp, use_tqdm=False)[0].text for p in prompts]
    tight = LLM(str(model_dir), device="cpu", num_kv_blocks=24, block_size=16, max_num_batched_tokens=16)
    outs = tight.generate(prompts, sp, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert [o.text for o in outs] == ref
    for o in outs:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_abort_drops_the_matcher(llm):
    seqs = [llm.add_request("Hello", _json_sp(seed=s)) for s in range(2)]
    assert llm.num_constrained == 2 and all(llm.requests[s.request_id].grammar is not None for s in seqs)
    llm.step()  # the prefill samples: each request takes its own matcher
    assert all(llm.requests[s.request_id].matcher is not None for s in seqs)
    for s in seqs:
        assert llm.abort(s.request_id)
    assert llm.num_constrained == 0 and not llm.requests


def test_prefill_runs_while_the_grammar_compiles(torch_path, model_dir, monkeypatch):
    """A compile that outlasts the prefill (chunked over several steps) delays the first sample, not the
    prefill; the outputs equal those of a grammar compiled before the request."""
    from gpt_engine.core.structured import Grammars
    prompts = ["x = 1 " * 40, "Hello"]
    sp = [_json_sp(seed=s, max_tokens=40) for s in range(2)]
    eager = LLM(str(model_dir), device="cpu", max_num_batched_tokens=32)
    eager.grammars.compile(sp[0].structured_outputs)
    ref = [o.token_ids for o in eager.generate(prompts, sp, use_tqdm=False)]
    build, steps = Grammars._build, []

    def slow_build(self, *a):
        import time
        time.sleep(0.5)
        steps.append(len(steps_taken))
        return build(self, *a)

    monkeypatch.setattr(Grammars, "_build", slow_build)
    lazy = LLM(str(model_dir), device="cpu", max_num_batched_tokens=32)
    steps_taken = []
    step = lazy.step
    monkeypatch.setattr(lazy, "step", lambda: steps_taken.append(1) or step())
    outs = lazy.generate(prompts, sp, use_tqdm=False)
    assert len(steps) == 1 and steps[0] >= 3  # compiled once, while the long prompt's chunks ran
    assert [o.token_ids for o in outs] == ref
    assert lazy.block_manager.num_free_blocks == lazy.block_manager.capacity


def test_other_requests_go_on_while_a_grammar_compiles(torch_path, model_dir, monkeypatch):
    """A compile never stalls the engine: while one request's grammar is held on the grammar thread, an
    unconstrained request beside it decodes to its end; then the constrained one samples, as it would have
    with its grammar compiled beforehand."""
    import threading
    from gpt_engine.core.structured import Grammars
    sp = _json_sp(seed=3, max_tokens=60)
    eager = LLM(str(model_dir), device="cpu")
    eager.grammars.compile(sp.structured_outputs)
    want = eager.generate(["def f():"], sp, use_tqdm=False)[0].token_ids
    release, build, released = threading.Event(), Grammars._build, []
    # released: whether the compile ran on the release (True) or after the engine had waited it out (False)
    monkeypatch.setattr(Grammars, "_build", lambda self, *a: released.append(release.wait(10)) or build(self, *a))
    llm = LLM(str(model_dir), device="cpu")
    llm.add_request("def f():", sp, request_id="constrained")
    llm.add_request("Hello", SamplingParams(max_tokens=12, ignore_eos=True), request_id="free")
    done = {}
    for _ in range(100):
        done.update({o.request_id: o for o in llm.step() if o.finished})
        if "free" in done:
            break
    assert len(done["free"].token_ids) == 12 and "constrained" not in done
    release.set()
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert done["constrained"].token_ids == want and released == [True]
    assert llm.block_manager.num_free_blocks == llm.block_manager.capacity


def test_core_structured_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys, gpt_engine.core.structured as s, gpt_engine.core.intake; "
            "s.Grammars(None, 10, []); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("so,word", [
    (dict(), "exactly one"),
    (dict(json=SCHEMA, regex="a"), "exactly one"),
    (dict(choice=[]), "choice"),
])
def test_bad_params_name_the_field(so, word):
    with pytest.raises(RequestError) as e:
        StructuredOutputsParams(**so)
    assert e.value.param == "structured_outputs" and word in str(e.value)


def test_min_tokens_with_a_grammar_is_refused():
    """A grammar that can end before min_tokens would leave no token to draw."""
    with pytest.raises(RequestError) as e:
        SamplingParams(min_tokens=3, structured_outputs=StructuredOutputsParams(choice=["a"]))
    assert e.value.param == "min_tokens"


@pytest.mark.parametrize("so,word", [
    (dict(json="{not json"), "not valid JSON"),
    (dict(json=json.loads('{"type":"array","items":' * 40 + '{}' + '}' * 40)), "deeper than"),
    (dict(regex="a" * 70000), "over the limit"),
    (dict(json=False), "accepts no value"),
])
def test_constraint_over_the_limits_is_refused_at_intake(llm, so, word):
    with pytest.raises(RequestError) as e:
        llm.prepare("Hello", SamplingParams(structured_outputs=StructuredOutputsParams(**so)))
    assert e.value.param == "structured_outputs" and word in str(e.value), str(e.value)


def test_nesting_depth_counts_objects_and_arrays():
    from gpt_engine.core.structured import _depth
    values = (1, "s", {}, [], {"a": 1}, {"a": [1, {"b": []}]}, [[[]], {}])
    assert [_depth(v, 32) for v in values] == [0, 0, 1, 1, 1, 4, 3]
    deep = json.loads("[" * 100 + "]" * 100)
    assert _depth(deep, 100) == 100 and _depth(deep, 7) == 8  # stops once past the limit


def test_schema_true_is_any_json_value(llm):
    """The boolean schema true (JSON Schema's "anything") compiles as the empty schema does."""
    from gpt_engine.core.structured import grammar_spec
    assert grammar_spec(StructuredOutputsParams(json=True)) == grammar_spec(StructuredOutputsParams(json={}))
    out = llm.generate("x = ", SamplingParams(max_tokens=60, seed=0, structured_outputs=StructuredOutputsParams(
        json="true")), use_tqdm=False)[0]
    if out.finish_reason == "stop":
        json.loads(out.text)


@pytest.mark.parametrize("so,word", [
    (dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "strin"),
    (dict(json={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
    (dict(regex="a(b"), "unclosed group"),
    (dict(grammar='start: "a" | foo'), "foo"),
])
def test_constraint_that_cannot_compile_is_refused_before_any_output(llm, so, word):
    """It compiles while the prefill runs: generate raises before any output, the other prompts' requests
    are dropped with it, and no KV block stays held."""
    sp = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**so))
    with pytest.raises(RequestError) as e:
        llm.generate(["Hello", "The cat sat"], [SamplingParams(max_tokens=8), sp], use_tqdm=False)
    assert e.value.param == "structured_outputs" and word in str(e.value), str(e.value)
    assert not llm.requests and llm.num_constrained == 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.capacity


def test_async_engine_stream_raises_a_grammar_that_cannot_compile(torch_path, model_dir):
    import asyncio

    from gpt_engine import AsyncLLM

    async def main():
        engine = AsyncLLM(LLM(str(model_dir), device="cpu"))
        await engine.start()
        try:
            bad = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="a(b"))
            with pytest.raises(RequestError):
                async for _ in engine.generate("Hello", bad):
                    pass
            outs = [o async for o in engine.generate("Hello", _json_sp(max_tokens=60, seed=1))]
            assert outs[-1].finished and not engine.llm.requests
        finally:
            await engine.stop()

    asyncio.run(main())


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def srv(torch_path, model_dir):
    with serving(model_dir) as server:
        yield server


def _post(srv, path, body, status=200):
    r = httpx.post(srv.url + path, json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def test_sdk_parse_with_pydantic_model(srv):
    import openai
    import pydantic

    class Inner(pydantic.BaseModel):
        ok: bool
        mood: Literal["calm", "busy"]

    class Answer(pydantic.BaseModel):
        color: Literal["red", "green", "blue"]
        sure: bool
        inner: Inner

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for seed in range(3):
        r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "pick"}],
                                          response_format=Answer, max_tokens=200, seed=seed)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Answer), msg.content


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_response_format_json_schema_and_object(srv, path):
    base = {"messages": [{"role": "user", "content": "hi"}]} if path.endswith("chat/completions") else {"prompt": "hi"}
    text = (lambda c: c["message"]["content"]) if "messages" in base else (lambda c: c["text"])
    body = _post(srv, path, {**base, "max_tokens": 300, "n": 3, "seed": 5, "response_format": {
        "type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}})
    for c in body["choices"]:
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(text(c)), SCHEMA)
    body = _post(srv, path, {**base, "max_tokens": 60, "temperature": 0, "response_format": {"type": "json_object"}})
    c = body["choices"][0]
    assert text(c).startswith("{")
    if c["finish_reason"] == "stop":
        assert isinstance(json.loads(text(c)), dict)


def test_vllm_structured_outputs_field(srv):
    body = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 20, "n": 4, "seed": 2,
                                          "structured_outputs": {"choice": ["alpha", "beta"]}})
    assert {c["text"] for c in body["choices"]} <= {"alpha", "beta"}
    body = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                                               "structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", body["choices"][0]["message"]["content"])


def test_the_grammar_compiles_while_the_prompt_is_prepared(srv, llm, monkeypatch):
    """A constraint goes to the grammar thread before the chat template renders (server) and before the
    prompt tokenizes (intake), so its compile overlaps them."""
    from gpt_engine.core.structured import grammar_spec

    def fresh(title):  # a schema no other test compiled
        so = StructuredOutputsParams(json={**SCHEMA, "title": title})
        return so, grammar_spec(so)

    so, key = fresh("rendered")
    grammars, seen = srv.engine.llm.grammars, []
    template = type(srv.engine.llm.chat_template)
    render = template.render
    monkeypatch.setattr(template, "render", lambda self, *a: seen.append(key in grammars._cache) or render(self, *a))
    body = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
                                               "response_format": {"type": "json_schema", "json_schema": {
                                                   "name": "x", "schema": so.json}}})
    assert seen == [True]
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), so.json)
    so, key = fresh("tokenized")
    encode, seen = llm.tokenizer.encode, []
    monkeypatch.setattr(llm.tokenizer, "encode", lambda *a, **k: seen.append(key in llm.grammars._cache) or
                        encode(*a, **k))
    llm.prepare("Hello", SamplingParams(max_tokens=8, structured_outputs=so))
    assert seen == [True]


def test_n2_streaming_stop_string_and_seed(srv):
    """n=2 seeded samples streamed with a stop string are the unstreamed samples cut at the stop."""
    base = {"prompt": "hi", "max_tokens": 300, "n": 2, "seed": 11, "structured_outputs": {"json": SCHEMA}}
    full = {c["index"]: c["text"] for c in _post(srv, "/v1/completions", base)["choices"]}
    for t in full.values():
        jsonschema.validate(json.loads(t), SCHEMA)
    stop = '"size"'
    got = {0: "", 1: ""}
    reasons = {}
    with httpx.stream("POST", srv.url + "/v1/completions", json={**base, "stream": True, "stop": [stop]},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                got[c["index"]] += c["text"]
                if c.get("finish_reason"):
                    reasons[c["index"]] = c["finish_reason"]
    for i in (0, 1):
        assert got[i] == full[i].split(stop)[0] and reasons[i] == "stop"


@pytest.mark.parametrize("extra,word", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "strin"),
    ({"structured_outputs": {"regex": "a(b"}}, "unclosed group"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_schema_is_400_naming_it(srv, extra, word, stream):
    err = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                              "stream": stream, **extra}, status=400)["error"]
    assert err["param"] == "structured_outputs" and word in err["message"], err


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
    {"response_format": {"type": "xml"}},
    {"response_format": {"type": "json_schema"}},
    {"structured_outputs": {"json": {}, "whitespace_pattern": " "}},
])
def test_bad_request_shapes_are_400(srv, extra):
    err = _post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 5, **extra}, status=400)["error"]
    assert (err["param"] or "").split(".")[0] in ("response_format", "structured_outputs", ""), err
