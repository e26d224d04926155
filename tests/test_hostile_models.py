"""Hostile model directories: every malformed or lying file is a ValueError naming the file before
memory the lie would size is allocated, never a crash or a hang, through load_model and LLM; a chat
template that loops or balloons is a RequestError (a 400 from the server) within its limits. A fuzz
test mutates valid checkpoints (truncation, flipped bytes, spliced files): each loads or is refused
with a ValueError naming the file."""
from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt_engine.chat_template import ChatTemplate
from gpt_engine.core.request import RequestError
from gpt_engine.llm import LLM
from gpt_engine.models import loader
from gpt_engine.models.loader import load_model
from tests.helpers import TEMPLATE, make_chat_model, make_hf_model, save_bin

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

LOADERS = {"load_model": load_model, "LLM": lambda d: LLM(str(d), device="cpu", num_kv_blocks=16)}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny llama and a tiny GPT-2 with a tokenizer and a chat template, never modified."""
    root = tmp_path_factory.mktemp("pristine")
    make_hf_model("llama", root / "llama")
    make_chat_model(root / "gpt2")
    shutil.copy(root / "gpt2" / "tokenizer.json", root / "llama")
    (root / "llama" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return root


def _copy(pristine, tmp_path, name="llama"):
    d = tmp_path / name
    shutil.copytree(pristine / name, d)
    return d


def _header(f):
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw, n, json.loads(raw[8:8 + n])


def _write_header(f, header, data):
    h = json.dumps(header).encode()
    f.write_bytes(len(h).to_bytes(8, "little") + h + data)


def _edit_entry(edit):
    """A mutation of model.safetensors: edit(header, entries sorted by offset) changes the header in place."""
    def mutate(d):
        f = d / "model.safetensors"
        raw, n, header = _header(f)
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        edit(header, names)
        _write_header(f, header, raw[8 + n:])
    return mutate


def _same_size_pair(header, names):
    seen = {}
    for k in names:
        key = (header[k]["dtype"], tuple(header[k]["shape"]))
        if key in seen:
            return seen[key], k
        seen[key] = k
    raise AssertionError("no two tensors of one shape")


def _overlap(header, names):
    a, b = _same_size_pair(header, names)
    header[b]["data_offsets"] = header[a]["data_offsets"]


def _raw_header(text: bytes, length=None):
    """model.safetensors with its header replaced by text (space-padded to the old length, the file's size
    kept) and its length field by `length` (default: the old one)."""
    def mutate(d):
        f = d / "model.safetensors"
        raw, n, _ = _header(f)
        f.write_bytes((length or n).to_bytes(8, "little") + text.ljust(n) + raw[8 + n:])
    return mutate


def _big_header(d):
    """A header length of 100 MB, in a (sparse) file long enough to hold it."""
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.write((100 * 10**6).to_bytes(8, "little"))
        fh.truncate(100 * 10**6 + 4096)


def _config(**over):
    def mutate(d):
        c = json.loads((d / "config.json").read_text())
        c.update(over)
        (d / "config.json").write_text(json.dumps(c))
    return mutate


def _write(name, data):
    def mutate(d):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return mutate


def _drop_tensor(d):
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    sd.pop("model.norm.weight")
    save_file(sd, d / "model.safetensors")


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


# name -> (mutation, the file the error names, what it says)
CASES = {
    "header longer than the file": (_raw_header(b"{}", 10**7), "model.safetensors", "header length"),
    "header of 100 MB": (_big_header, "model.safetensors", "header is 100000000 bytes"),
    "header not JSON": (_raw_header(b"{{{{"), "model.safetensors", "not valid JSON"),
    "header not an object": (_raw_header(b"[]"), "model.safetensors", "not an object"),
    "overlapping offsets": (_edit_entry(_overlap), "model.safetensors", "overlapping"),
    "offsets past the end": (_edit_entry(lambda h, ns: h[ns[-1]].update(
        data_offsets=[o + 10**12 for o in h[ns[-1]]["data_offsets"]])), "model.safetensors", "out-of-range"),
    "offsets not the dtype's size": (_edit_entry(lambda h, ns: h[ns[0]].update(dtype="F16")), "model.safetensors",
                                     "bad safetensors header entry"),
    "negative shape": (_edit_entry(lambda h, ns: h[ns[0]].update(shape=[-1, 2])), "model.safetensors",
                       "bad safetensors header entry"),
    "unknown dtype": (_edit_entry(lambda h, ns: h[ns[0]].update(dtype="Q7")), "model.safetensors", "dtype Q7"),
    "integer dtype": (_edit_entry(lambda h, ns: h[ns[0]].update(dtype="I32")), "model.safetensors", "floating"),
    "wrong shape": (_edit_entry(lambda h, ns: h[ns[0]].update(shape=h[ns[0]]["shape"][::-1])), "model.safetensors",
                    "shape"),
    "missing tensor": (_drop_tensor, "llama", "missing tensor"),
    "truncated data": (_truncate, "model.safetensors", "truncated"),
    "vocab 10^12": (_config(vocab_size=10**12), "config.json", "parameters"),
    "10^6 layers": (_config(num_hidden_layers=10**6), "config.json", "parameters"),
    "d_ff 10^9": (_config(intermediate_size=10**9), "config.json", "parameters"),
    "negative heads": (_config(num_attention_heads=-4), "config.json", "num_attention_heads"),
    "zero heads": (_config(num_attention_heads=0), "config.json", "num_attention_heads"),
    "zero kv heads": (_config(num_key_value_heads=0), "config.json", "num_key_value_heads"),
    "hidden size off the weights": (_config(hidden_size=130), "model.safetensors", "shape"),
    "config not JSON": (_write("config.json", "{nope"), "config.json", "not valid JSON"),
    "config not an object": (_write("config.json", "[1, 2]"), "config.json", "object"),
    "config not text": (_write("config.json", b"\xff\xfe\x00"), "config.json", "not valid JSON"),
}


@pytest.mark.parametrize("entry", list(LOADERS))
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_is_a_value_error_naming_it(pristine, tmp_path, monkeypatch, case, entry):
    mutate, file, word = CASES[case]
    d = _copy(pristine, tmp_path)
    mutate(d)

    def no_model(cfg):  # the model is never built from a config its weights cannot back
        raise AssertionError(f"model built for {cfg}")
    if file == "config.json":
        monkeypatch.setattr(loader, "GPT", no_model)
    with pytest.raises(ValueError, match=word) as e:
        LOADERS[entry](d)
    assert file in str(e.value)


def test_hidden_size_not_divisible_by_heads(pristine, tmp_path):
    d = _copy(pristine, tmp_path, "gpt2")
    _config(n_embd=66, n_head=4)(d)
    with pytest.raises(ValueError, match="divisible"):
        load_model(d)


@pytest.mark.parametrize("name,data", [("tokenizer.json", "not a tokenizer"), ("tokenizer.json", '{"a": 1}'),
                                       ("tokenizer_config.json", "{x"), ("generation_config.json", "[")])
def test_bad_tokenizer_files(pristine, tmp_path, name, data):
    d = _copy(pristine, tmp_path)
    _write(name, data)(d)
    load_model(d)  # the weights need none of them
    with pytest.raises(ValueError, match=name):
        LOADERS["LLM"](d)


def test_pytorch_model_bin_with_a_pickled_payload(pristine, tmp_path):
    """A .bin carrying an object whose unpickling would run code (write a file) is refused by
    torch.load(weights_only=True): a ValueError naming the file, and the code never ran."""
    hf = make_hf_model("llama", tmp_path / "hf", save=False)
    d = tmp_path / "bin"
    save_bin(hf, d)
    ran = tmp_path / "ran"
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({**sd, "x": _Payload(str(ran))}, d / "pytorch_model.bin")
    for entry in LOADERS.values():
        with pytest.raises(ValueError, match="weights-only") as e:
            entry(d)
        assert "pytorch_model.bin" in str(e.value)
    assert not ran.exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --- chat templates -----------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}]
LOOPS = {
    "range 10^9": "{% for i in range(10**9) %}x{% endfor %}",
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "macro fan-out": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "loop over the messages' text": "{% for m in messages %}{% for a in m.content %}{% for b in m.content %}"
                                    "{% for c in m.content %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
}
BALLOONS = {
    "output": "{% for i in range(99999) %}{{ messages[0].content }}{% endfor %}",
    "repeated string": "{{ 'x' * 10**10 }}",
    "power": "{{ 7 ** (10 ** 8) }}",
    "namespace doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}",
    "filter width": "{{ 'x'|center(10**12) }}",
    "method width": "{{ 'x'.ljust(10**12) }}",
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_looping_template_stops_at_the_time_limit(name):
    t = ChatTemplate(LOOPS[name], max_seconds=0.2)
    with pytest.raises(RequestError, match="Range too big|size limit|took more than 0.2 s") as e:
        t.render([{"role": "user", "content": "x" * 1000}])
    assert e.value.param == "messages"


@pytest.mark.parametrize("name", list(BALLOONS))
def test_ballooning_template_stops_at_the_size_limit(name):
    t = ChatTemplate(BALLOONS[name], max_chars=10_000)
    with pytest.raises(RequestError, match="limit"):
        t.render([{"role": "user", "content": "x" * 100}])


def test_limits_leave_real_templates_alone():
    t = ChatTemplate(TEMPLATE, {"bos_token": "<s>"}, max_seconds=5, max_chars=10_000)
    msgs = [{"role": "user", "content": "hello " * 100}] * 10
    assert t.render(msgs) == t._template.environment.from_string(TEMPLATE).render(
        messages=msgs, add_generation_prompt=True, bos_token="<s>")
    with pytest.raises(RequestError, match="10000 characters"):
        t.render(msgs * 3)
    with pytest.raises(ValueError, match="chat template"):
        ChatTemplate("{% for %}")


def test_hostile_template_in_the_model_directory(pristine, tmp_path):
    d = _copy(pristine, tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}))
    llm = LLM(str(d), device="cpu", num_kv_blocks=16)
    with pytest.raises(RequestError, match="size limit"):
        llm.chat(CHAT)
    llm.chat_template = ChatTemplate(LOOPS["nested loops"], max_seconds=0.2)
    with pytest.raises(RequestError, match="took more than"):
        llm.chat(CHAT)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="chat template.*tokenizer_config.json"):
        LLM(str(d), device="cpu", num_kv_blocks=16)


def test_server_answers_a_looping_template_with_400(pristine, torch_path):
    from gpt_engine.async_llm import AsyncLLM
    from gpt_engine.cli.serve import build_app
    from tests.helpers import ServerThread
    engine = AsyncLLM(LLM(str(pristine / "gpt2"), device="cpu", num_kv_blocks=16))
    for src in (LOOPS["nested loops"], BALLOONS["output"]):
        app = build_app(engine, chat_template=ChatTemplate(src, max_seconds=0.3, max_chars=10_000))
        with ServerThread(app) as server:
            r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "messages" and err["code"] == "chat_template_limit", err
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# --- fuzzing --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def originals(pristine, tmp_path_factory):
    """The bytes of valid weight files: the llama's and the GPT-2's model.safetensors, the llama as a .bin."""
    d = tmp_path_factory.mktemp("bin")
    save_bin(make_hf_model("llama", d / "hf", save=False), d)
    return {"llama": (pristine / "llama" / "model.safetensors").read_bytes(),
            "gpt2": (pristine / "gpt2" / "model.safetensors").read_bytes(),
            "bin": (d / "pytorch_model.bin").read_bytes()}


def _mutations(originals):
    def truncated(name):
        data = originals[name]
        return st.integers(0, len(data) - 1).map(lambda k: (name, data[:k]))

    def flipped(name):
        data = originals[name]
        n = 8 + int.from_bytes(data[:8], "little") if name != "bin" else len(data)
        pos = st.one_of(st.integers(0, n - 1), st.integers(0, len(data) - 1))  # the header, or anywhere
        flips = st.lists(st.tuples(pos, st.integers(1, 255)), min_size=1, max_size=4)

        def apply(fs):
            b = bytearray(data)
            for p, x in fs:
                b[p] ^= x
            return name, bytes(b)
        return flips.map(apply)

    def spliced(a, b):
        da, db = originals[a], originals[b]
        header = 8 + int.from_bytes(da[:8], "little")
        cut = st.one_of(st.just(header), st.integers(0, min(len(da), len(db))))  # a's header on b's data, or any cut
        return cut.map(lambda k: (a, da[:k] + db[k:]))

    return st.one_of(truncated("llama"), truncated("bin"), flipped("llama"), flipped("bin"),
                     spliced("llama", "gpt2"), spliced("gpt2", "llama"))


def test_fuzzed_weight_files_load_or_name_the_file(pristine, originals, tmp_path):
    """Mutated files either load (a flipped byte in tensor data is a valid checkpoint) or are a ValueError
    naming the file; nothing else (no other exception, crash or hang)."""
    d = _copy(pristine, tmp_path)
    configs = {n: (pristine / ("gpt2" if n == "gpt2" else "llama") / "config.json").read_text() for n in originals}

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutations(originals))
    def check(mutation):
        name, data = mutation
        for f in ("model.safetensors", "pytorch_model.bin"):
            (d / f).unlink(missing_ok=True)
        weights = d / ("pytorch_model.bin" if name == "bin" else "model.safetensors")
        weights.write_bytes(data)
        (d / "config.json").write_text(configs[name])
        try:
            load_model(d)
        except ValueError as e:
            assert weights.name in str(e) or "config.json" in str(e), e
    check()
