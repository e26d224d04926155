"""Chat: templates rendered as transformers renders them (text and token ids), LLM.chat == LLM.generate on
the rendered ids, and the terminal chat (`gpt-engine chat`) driven through a pseudo-terminal."""
from __future__ import annotations

import json
import os
import pty
import select
import sys
import time

import pytest

from gpt_engine.cli.chat import PROMPT, STOPPED, Chat, repl
from gpt_engine.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from gpt_engine.llm import LLM
from gpt_engine import SamplingParams
from gpt_engine.tokenizer import Tokenizer

from .helpers import make_hf_model, train_bpe

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

# Qwen2's template (ChatML, a default system prompt)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3.1's layout: header tokens, a date (the branch without strftime_now), trimmed contents
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Llama 2 / Mistral style: the system prompt folded into the first user turn, alternation enforced
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
# loop controls: tool messages skipped, nothing rendered after a "STOP" message
LOOPS = (
    "{% for message in messages %}{% if message['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% if message['content'] == 'STOP' %}{% break %}{% endif %}"
    "{{ '<' + message['role'] + '>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]
TEMPLATES = {"qwen2": (QWEN2, "<|endoftext|>", "<|im_end|>"), "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
             "llama2": (LLAMA2, "<s>", "</s>"), "loops": (LOOPS, "<|endoftext|>", "<|endoftext|>")}
TEXT = ("You are a helpful assistant. What is the capital of France? Paris is the capital. "
        "Tell me a joke about numbers 12345 and symbols ()[]{}. Sure, here it is: seven ate nine. ") * 30
CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Answer briefly.  "}, {"role": "user", "content": "Tell me a joke"},
     {"role": "assistant", "content": "Seven ate nine. "}, {"role": "user", "content": "Another one, about ()[]{}"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "12345"}],
]
LOOP_CONV = [{"role": "user", "content": "a"}, {"role": "tool", "content": "skipped"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "STOP"},
             {"role": "assistant", "content": "never"}]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([TEXT], vocab_size=400, special_tokens=SPECIALS).save(str(path))
    return path


def model_dir(root, tokenizer_json, name, template=None, bos=None, eos="<|endoftext|>", weights=False, **kw):
    d = root / name
    d.mkdir()
    (d / "tokenizer.json").write_text(tokenizer_json.read_text())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, **({"bos_token": bos} if bos else {})}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if weights:
        make_hf_model("gpt2", d, vocab_size=Tokenizer.load(d).vocab_size, **kw)
    return d


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("templates")
    return {name: model_dir(root, tokenizer_json, name, src, bos, eos) for name, (src, bos, eos) in TEMPLATES.items()}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer_json):
    return model_dir(tmp_path_factory.mktemp("chat"), tokenizer_json, "m", QWEN2, eos="<|im_end|>", weights=True)


def hf_render(d, conv, add_generation_prompt, **kw):
    from transformers import AutoTokenizer
    at = AutoTokenizer.from_pretrained(str(d))
    text = at.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    ids = at.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt, **kw)["input_ids"]
    return text, ids


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_as_transformers(template_dirs, name, add_generation_prompt):
    d = template_dirs[name]
    tok = Tokenizer.load(d)
    template = ChatTemplate.of_tokenizer(tok)
    convs = CONVS + ([LOOP_CONV] if name == "loops" else [])
    for conv in convs:
        text, ids = hf_render(d, conv, add_generation_prompt)
        assert template.render(conv, add_generation_prompt) == text
        assert tok.encode(text, add_special_tokens=False) == ids
    # the special tokens are single tokens in both: the comparison is over real template tokens
    assert tok.encode(TEMPLATES[name][2]) == [tok.eos_token_id]


def test_loop_controls_skip_and_stop(template_dirs):
    text = ChatTemplate.of_tokenizer(Tokenizer.load(template_dirs["loops"])).render(LOOP_CONV, False)
    assert text == "<user>a<|endoftext|><assistant>b<|endoftext|>"


def test_raise_exception_for_bad_roles(template_dirs):
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    d = template_dirs["llama2"]
    with pytest.raises(ValueError, match="roles must alternate"):
        ChatTemplate.of_tokenizer(Tokenizer.load(d)).render(bad)
    with pytest.raises(TemplateError, match="roles must alternate"):
        AutoTokenizer.from_pretrained(str(d)).apply_chat_template(bad, tokenize=False)


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_llm_chat_equals_generate_on_rendered_ids(chat_model):
    llm = LLM(str(chat_model), device="cpu")
    _, ids = hf_render(chat_model, CONVS[1], True)
    one = llm.chat(CONVS[1], GREEDY, use_tqdm=False)
    assert len(one) == 1 and one[0].prompt == hf_render(chat_model, CONVS[1], True)[0]
    assert one[0].prompt_token_ids == ids
    assert one[0].token_ids == llm.generate([ids], GREEDY, use_tqdm=False)[0].token_ids
    many = llm.chat(CONVS, GREEDY, use_tqdm=False)
    refs = llm.generate([hf_render(chat_model, c, True)[1] for c in CONVS], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in many] == [r.token_ids for r in refs]
    assert many[1].token_ids == one[0].token_ids


def test_llm_chat_template_override_and_missing(chat_model, tmp_path, tokenizer_json):
    llm = LLM(str(chat_model), device="cpu")
    out = llm.chat(LOOP_CONV[:3], GREEDY, chat_template=LOOPS, use_tqdm=False)[0]
    text, ids = hf_render(chat_model, LOOP_CONV[:3], True, chat_template=LOOPS)
    assert out.prompt == text and out.prompt_token_ids == ids
    bare = model_dir(tmp_path, tokenizer_json, "bare", weights=True)
    with pytest.raises(ValueError, match="no chat template"):
        LLM(str(bare), device="cpu").chat(CONVS[0], GREEDY, use_tqdm=False)


# --- the terminal chat ----------------------------------------------------------------------

def test_chat_keeps_history_and_streams(chat_model):
    llm = LLM(str(chat_model), device="cpu")
    chat = Chat(llm, ChatTemplate.of_tokenizer(llm.tokenizer), GREEDY, system="Answer briefly.")
    seen = []
    first = chat.send("What is the capital of France?", seen.append)
    assert len(seen) > 2 and "".join(seen) == first + "\n"  # one write per streamed step, then the newline
    assert chat.history == [{"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": "What is the capital of France?"},
                            {"role": "assistant", "content": first}]
    ref = llm.chat(chat.history + [{"role": "user", "content": "why?"}], GREEDY, use_tqdm=False)[0].text
    assert chat.send("why?", lambda s: None) == ref
    chat.reset()
    assert chat.history == [{"role": "system", "content": "Answer briefly."}]

    writes = []

    def stop_after_two(s):  # as Ctrl-C does, mid-answer
        writes.append(s)
        if len(writes) == 2:
            chat.stop()
    cut = chat.send("hi", stop_after_two)
    assert writes[-1] == "\n" and writes[-2] == f" {STOPPED}" and cut == "".join(writes[:2])
    assert not llm.has_unfinished() and llm.stats()["num_free_blocks"] == llm.stats()["num_total_blocks"]
    assert chat.history[-1] == {"role": "assistant", "content": cut}


def test_repl_commands_and_end_of_input(chat_model):
    llm = LLM(str(chat_model), device="cpu")
    chat = Chat(llm, ChatTemplate.of_tokenizer(llm.tokenizer), GREEDY)
    lines = iter(["hello", "  ", "/reset", "again"])

    def read(prompt):
        assert prompt == PROMPT
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    out = []
    assert repl(chat, read, out.append) == 0
    assert "[conversation reset]\n" in out and [m["content"] for m in chat.history[:1]] == ["again"]
    rest = iter(["/exit", "never read"])
    assert repl(chat, lambda p: next(rest), out.append) == 0 and next(rest) == "never read"


class Terminal:
    """A child process on a pseudo-terminal: what it writes, read as it comes; keys sent as typed."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is a SIGINT
            os.execvpe(argv[0], argv, env)
        self.out = ""
        self.pos = 0

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """Output from the last match up to and including marker."""
        end = time.monotonic() + timeout
        while marker not in self.out[self.pos:]:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout}s; output: {self.out[self.pos:]!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat exited before {marker!r}; output: {self.out[self.pos:]!r}")
                self.out += chunk.decode("utf-8", errors="replace")
        i = self.out.index(marker, self.pos) + len(marker)
        got, self.pos = self.out[self.pos:i], i
        return got

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 60) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:  # drain, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


@pytest.fixture(scope="module")
def long_chat_model(tmp_path_factory, tokenizer_json):
    # a long context, so an answer to the end of it takes long enough to interrupt
    return model_dir(tmp_path_factory.mktemp("long"), tokenizer_json, "m", DEFAULT_CHAT_TEMPLATE, weights=True,
                     n_positions=4096)


def test_terminal_chat_streams_stops_on_ctrl_c_and_exits(long_chat_model):
    env = {**os.environ, "PYTHONSAFEPATH": "1", "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "gpt_engine", "chat", str(long_chat_model), "--device", "cpu",
                     "--system", "Be brief.", "--max-tokens", "4000", "--ignore-eos", "--temperature", "0"], env)
    try:
        term.read_until(PROMPT)
        for message in ("hello there", "/reset", "and again"):
            term.send(message + "\n")
            term.read_until(message)  # the echo
            if message == "/reset":
                assert "[conversation reset]" in term.read_until(PROMPT)
                continue
            streamed = ""
            while len(streamed.strip()) < 20:  # the answer arrives piece by piece while it is written
                streamed += _more(term)
            term.send("\x03")
            answer = term.read_until(STOPPED)
            # the answer, the terminal's ^C echo, the marker: no note, no new prompt in between
            assert PROMPT not in answer and "[" not in streamed + answer.removesuffix(STOPPED)
            term.read_until(PROMPT)
        term.send("/exit\n")
        assert term.exit_code() == 0
    finally:
        try:
            os.kill(term.pid, 9)
        except ProcessLookupError:
            pass


def _more(term: Terminal, timeout: float = 120) -> str:
    """Whatever the child writes next."""
    if not select.select([term.fd], [], [], timeout)[0]:
        raise AssertionError(f"no output within {timeout}s")
    chunk = os.read(term.fd, 4096).decode("utf-8", errors="replace")
    term.out += chunk
    term.pos = len(term.out)
    return chunk
