"""Tool calling: the parsers on hand-written model outputs, the schema of a forced call, tools through
the chat template (as transformers renders them, offline and served), and the server's answers,
whole and streamed. A random model writes no tool calls: the served tests force the engine's sampled
tokens to a scripted text (the rest of the engine — scheduler, detokenizer, stop check — runs as is)."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from gpt_engine.api.tool_parsers import ForcedToolParser, ToolStreamer, tool_parser, tool_parsers
from gpt_engine.api.tools import tool_call_schema
from gpt_engine.chat_template import ChatTemplate
from tests.helpers import ServerThread, make_chat_model

# Qwen2.5's template (the Hermes tool format): tools in the system turn, calls in <tool_call> tags,
# results in <tool_response> tags inside a user turn
QWEN_TOOLS = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
# a conversation through one round of tool use; the OpenAI form (arguments a JSON string, content null)
CONV = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "user", "content": "And the time?"}]


def template_form(conv):
    """CONV as chat templates take it (and the server hands it over): arguments as objects, content text."""
    out = []
    for m in conv:
        m = json.loads(json.dumps(m))
        for tc in m.get("tool_calls", ()):
            tc["function"]["arguments"] = json.loads(tc["function"]["arguments"])
        out.append({**m, "content": m["content"] or ""})
    return out


def hf_render(tokenizer_file, conv, tools, add_generation_prompt=True):
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    return tok.apply_chat_template(conv, tools=tools, chat_template=QWEN_TOOLS, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


def hermes(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


# ---------------------------------------------------------------- parsers

def calls_of(p):
    return [(c.name, json.loads(c.arguments)) for c in p.calls]


def test_registered_parsers():
    assert {"hermes", "llama3_json"} <= set(tool_parsers())
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_parser("nope")


def test_hermes_calls_and_the_text_around_them():
    p = tool_parser("hermes")
    text = "Let me look.\n" + hermes("get_weather", {"city": "Paris"}) + "\n" + hermes("get_time", {"zone": "CET"}) \
        + " done"
    out = p.parse(text)
    assert calls_of(out) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert out.content == "Let me look.\n\n done"
    assert len({c.id for c in out.calls}) == 2
    assert p.parse("no calls here") .content == "no calls here" and not p.parse("no calls here").calls
    # a call the output ends inside counts, as vLLM reads it
    out = p.parse('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}')
    assert calls_of(out) == [("get_time", {"zone": "UTC"})] and out.content == ""


@pytest.mark.parametrize("bad", ['{"name": "f", "arguments": {"a": 1}', '{"arguments": {}}', "not json",
                                 '{"name": "f", "arguments": [1]}'])
def test_hermes_malformed_call_stays_content(bad):
    p = tool_parser("hermes")
    text = "a " + "<tool_call>" + bad + "</tool_call> b " + hermes("g", {})
    out = p.parse(text)
    assert out.content == "a <tool_call>" + bad + "</tool_call> b "
    assert calls_of(out) == [("g", {})]


@pytest.mark.parametrize("text,calls,content", [
    ('{"name": "get_time", "parameters": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})], ""),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}',
     [("f", {"a": 1}), ("g", {})], ""),
    (' {"name": "f", "parameters": {}} and then some', [("f", {})], " and then some"),
    ('{"name": "f", "parameters": {"a": 1}', [], '{"name": "f", "parameters": {"a": 1}'),   # malformed
    ('{"a": 1}', [], '{"a": 1}'),                                                          # not a call
    ('The answer is {"name": "f"}', [], 'The answer is {"name": "f"}'),                    # not at the start
    ("", [], ""),
])
def test_llama3_json(text, calls, content):
    out = tool_parser("llama3_json").parse(text)
    assert calls_of(out) == calls and out.content == content


STREAM_CASES = [
    ("hermes", "Sure.\n" + hermes("get_weather", {"city": "Paris"}) + "\n" + hermes("get_time", {"zone": "CET"})),
    ("hermes", "x <tool_call>{bad}</tool_call> y <tool_ca"),
    ("hermes", "\n" + hermes("get_time", {"zone": "CET"}) + "\n"),
    ("hermes", "just text with < and <tool"),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": [1, 2]}}; {"name": "g", "parameters": {}}'),
    ("llama3_json", "plain answer"),
]


@pytest.mark.parametrize("name,text", STREAM_CASES)
def test_stream_accumulates_to_the_whole_parse(name, text):
    """Whatever the delta sizes, a stream's content and calls add up to the parse of the whole output."""
    parser = tool_parser(name)
    whole = parser.parse(text)
    for step in (1, 2, 3, 7, len(text) or 1):
        s, content, calls = ToolStreamer(parser), "", []
        pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
        for k, piece in enumerate(pieces):
            c, new = s.feed(piece, k == len(pieces) - 1)
            content += c
            calls += new
        assert content == (whole.content if whole.content.strip() else "")
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.calls]


def test_forced_parser_reads_the_schema_shapes():
    p = ForcedToolParser()
    assert calls_of(p.parse('{"name": "get_time", "arguments": {"zone": "UTC"}}')) == [("get_time", {"zone": "UTC"})]
    out = p.parse('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"x": 1}}]')
    assert calls_of(out) == [("f", {}), ("g", {"x": 1})] and out.content == ""
    assert p.parse("free text").content == "free text" and not p.parse("free text").calls
    assert p.parse('{"name": "f"', final=False).content == ""   # nothing settles before the end


# ---------------------------------------------------------------- the schema of a forced call

def test_tool_call_schema_named():
    schema = tool_call_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "arguments": {"city": "Paris"}},
          {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}]
    bad = [{"name": "get_time", "arguments": {"city": "Paris"}},           # another function
           {"name": "get_weather", "arguments": {"unit": "C"}},             # a required argument missing
           {"name": "get_weather", "arguments": {"city": "X", "unit": "K"}},  # outside the enum
           {"name": "get_weather"}, {"name": "get_weather", "arguments": {"city": "X"}, "extra": 1}]
    for s in ok:
        jsonschema.validate(s, schema)
    for s in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(s, schema)
    # what the schema admits, the forced parser reads
    assert calls_of(ForcedToolParser().parse(json.dumps(ok[1]))) == [("get_weather", ok[1]["arguments"])]


def test_tool_call_schema_required():
    schema = tool_call_schema(TOOLS + [{"type": "function", "function": {"name": "ping"}}], "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [[{"name": "get_time", "arguments": {"zone": "UTC"}}],
          [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "ping", "arguments": {}}]]
    bad = [[], {"name": "get_time", "arguments": {"zone": "UTC"}},          # none; not a list
           [{"name": "get_time", "arguments": {"zone": "UTC", "x": 1}}],    # additionalProperties false
           [{"name": "nope", "arguments": {}}]]
    for s in ok:
        jsonschema.validate(s, schema)
        assert [c.name for c in ForcedToolParser().parse(json.dumps(s)).calls] == [c["name"] for c in s]
    for s in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(s, schema)


# ---------------------------------------------------------------- tools through the chat template

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("tools-model"), n_positions=2048)  # the tools make long prompts


@pytest.mark.parametrize("tools", [TOOLS, None])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_tools_as_transformers(model_dir, tools, add_generation_prompt):
    conv = template_form(CONV)
    text = ChatTemplate(QWEN_TOOLS).render(conv, add_generation_prompt, tools)
    assert text == hf_render(model_dir / "tokenizer.json", conv, tools, add_generation_prompt)
    assert ('"name": "get_time"' in text) == bool(tools)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in text


def test_llm_chat_renders_tools(torch_path, model_dir):
    from gpt_engine import LLM, SamplingParams
    llm = LLM(str(model_dir), device="cpu")
    conv = template_form(CONV)
    out = llm.chat(conv, SamplingParams(max_tokens=1, temperature=0), chat_template=QWEN_TOOLS, tools=TOOLS,
                   use_tqdm=False)[0]
    assert out.prompt == hf_render(model_dir / "tokenizer.json", conv, TOOLS)
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)


# ---------------------------------------------------------------- served

class Scripted:
    """Forces the served engine's sampled tokens to script's tokens, then EOS: each request's i-th
    generated token is the script's i-th. Records the prompts the engine was asked to prepare."""

    def __init__(self, engine):
        self.llm, self.ids, self.prompts = engine.llm, [], []
        run, prepare = self.llm.runner.run, engine.prepare
        eos = min(self.llm.eos_token_ids)

        def forced(batch):
            tokens, logprobs, scored = run(batch)
            if self.ids is None:   # free(): the model's own tokens
                return tokens, logprobs, scored
            tokens = [t if t is None else (self.ids[n] if (n := len(s.output_token_ids)) < len(self.ids) else eos)
                      for s, t in zip(batch.seqs, tokens)]
            return tokens, logprobs, scored

        def recording(prompt, *a, **kw):
            self.prompts.append(prompt)
            return prepare(prompt, *a, **kw)
        self.llm.runner.run, engine.prepare = forced, recording

    def free(self):
        self.ids = None

    def say(self, text: str):
        self.ids = self.llm.tokenizer.encode(text, add_special_tokens=False)
        assert self.llm.tokenizer.decode(self.ids) == text
        self.prompts.clear()


@pytest.fixture(scope="module")
def srv(torch_path, model_dir):
    from gpt_engine.async_llm import AsyncLLM
    from gpt_engine.cli.serve import build_app
    from gpt_engine.llm import LLM
    engine = AsyncLLM(LLM(str(model_dir), device="cpu"))
    script = Scripted(engine)
    app = build_app(engine, chat_template=ChatTemplate(QWEN_TOOLS), enable_auto_tool_choice=True,
                    tool_call_parser="hermes")
    with ServerThread(app) as server:
        server.engine, server.script, server.state = engine, script, app.state.server
        yield server


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


SAID = "Checking.\n" + hermes("get_weather", {"city": "Paris", "unit": "C"}) + "\n" + hermes("get_time", {"zone": "CET"})


def ask(client, srv, **kw):
    return client.chat.completions.create(model=srv.engine.model_name, messages=CONV, tools=TOOLS, max_tokens=200,
                                          temperature=0, **kw)


def test_served_prompt_is_the_templates_rendering(srv, client, model_dir):
    """The OpenAI form (arguments a JSON string, content null) reaches the template as transformers takes it."""
    srv.script.say("hi")
    ask(client, srv)
    assert srv.script.prompts == [hf_render(model_dir / "tokenizer.json", template_form(CONV), TOOLS)]


def test_tokenize_renders_tools(srv, model_dir):
    r = httpx.post(srv.url + "/tokenize", json={"messages": CONV, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    text = hf_render(model_dir / "tokenizer.json", template_form(CONV), TOOLS)
    assert r.json()["tokens"] == srv.engine.tokenizer.encode(text, add_special_tokens=False)


def test_auto_tool_calls_whole(srv, client):
    srv.script.say(SAID)
    r = ask(client, srv)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Checking.\n\n"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]
    assert all(t.type == "function" for t in c.message.tool_calls)
    assert len({t.id for t in c.message.tool_calls}) == 2
    # parallel_tool_calls false: the first call only
    r = ask(client, srv, parallel_tool_calls=False)
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_weather"]


def test_auto_tool_calls_streamed(srv, client):
    srv.script.say(SAID)
    whole = ask(client, srv).choices[0].message
    chunks = list(ask(client, srv, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or ():
            if tc.function.name is not None:    # the first delta of a call: id, type, name, once
                assert tc.index not in calls and tc.id and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.id is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert content == whole.content
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole.tool_calls]
    assert len({c["id"] for c in calls.values()}) == 2
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    # the SDK's own accumulation of the stream
    with client.chat.completions.stream(model=srv.engine.model_name, messages=CONV, tools=TOOLS, max_tokens=200,
                                        temperature=0) as stream:
        final = stream.get_final_completion()
    m = final.choices[0].message
    assert [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole.tool_calls]


def test_no_calls_is_content(srv, client):
    srv.script.say("It is sunny.")
    r = ask(client, srv)
    assert r.choices[0].message.content == "It is sunny." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    srv.script.say(SAID)
    r = ask(client, srv, tool_choice="none")   # the model's text as it is
    assert r.choices[0].message.content == SAID and not r.choices[0].message.tool_calls


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_reads_the_json(srv, client, monkeypatch, choice):
    # needs no parser flag
    monkeypatch.setattr(srv.state, "tool_call_parser", None)
    said = [{"name": "get_time", "arguments": {"zone": "UTC"}}]
    # compact, as the constraint (structured outputs) lets the model write it
    srv.script.say(json.dumps(said if choice == "required" else said[0], separators=(",", ":")))
    r = ask(client, srv, tool_choice=choice)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls] == \
        [("get_time", {"zone": "UTC"})]
    chunks = list(ask(client, srv, tool_choice=choice, stream=True))
    names = [tc.function.name for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or ()
             if tc.function.name]
    assert names == ["get_time"]


UNIT = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"], "additionalProperties": False}}}


def test_named_tool_choice_is_enforced(srv, client, monkeypatch):
    """A random model writes no tool call by itself: a named tool_choice makes it write one whose arguments
    validate against the function's parameters (structured outputs), with no parser flag."""
    import jsonschema
    monkeypatch.setattr(srv.state, "tool_call_parser", None)
    srv.script.free()
    choice = {"type": "function", "function": {"name": "set_unit"}}
    for seed in range(3):
        r = client.chat.completions.create(model=srv.engine.llm.model_name, messages=CONV, tools=[UNIT, TIME],
                                           tool_choice=choice, max_tokens=64, temperature=1.0, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["set_unit"], r.choices[0]
        jsonschema.validate(json.loads(calls[0].function.arguments), UNIT["function"]["parameters"])
    r = _post(srv, {"tools": [UNIT], "tool_choice": choice, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


def _post(srv, body):
    return httpx.post(srv.url + "/v1/chat/completions", json={"messages": CONV, "max_tokens": 1, **body}, timeout=60)


@pytest.mark.parametrize("body,param,words", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name", "Field required"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name", "at least 1"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "x", "type": "function",
                                                         "function": {"name": "f", "arguments": "{oops"}}]}],
      "tools": TOOLS, "tool_choice": "none"}, "messages.0.tool_calls.0.function.arguments", "not valid JSON"),
])
def test_bad_tool_requests_are_400_naming_the_field(srv, body, param, words):
    r = _post(srv, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_auto_without_the_parser_flag_is_400(srv, monkeypatch):
    monkeypatch.setattr(srv.state, "tool_call_parser", None)
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):   # "auto" is the default with tools
        r = _post(srv, body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "tool_choice" and "--enable-auto-tool-choice" in err["message"]


def test_serve_flags():
    import argparse

    from gpt_engine.cli.serve import add_args
    p = argparse.ArgumentParser()
    add_args(p)
    a = p.parse_args(["m", "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"])
    assert a.enable_auto_tool_choice and a.tool_call_parser == "llama3_json"
    with pytest.raises(SystemExit):
        p.parse_args(["m", "--tool-call-parser", "nope"])
