"""Chat templates rendered as transformers' apply_chat_template renders them: the model's jinja
template (chat_template.jinja or tokenizer_config.json) in a sandboxed environment with what hub
templates use (raise_exception, strftime_now, tojson, loop controls, {% generation %} blocks,
the tokenizer's special tokens). A model without a template has none: no format is guessed."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .core.request import RequestError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(msg):
    raise ValueError(msg)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Generation(Extension):
    """{% generation %}...{% endgeneration %} (marks assistant text for training masks): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        if not source:
            raise ValueError("a chat template needs its jinja source")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = _environment().from_string(source)

    @classmethod
    def of_tokenizer(cls, tokenizer, source: str | None = None) -> "ChatTemplate | None":
        """source (or the tokenizer's own template) with the tokenizer's special tokens; None without a template."""
        source = source or getattr(tokenizer, "chat_template", None)
        if not source:
            return None
        return cls(source, {k: getattr(tokenizer, k, None) for k in SPECIAL_TOKENS})

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """tools: JSON-schema function definitions ({"type": "function", "function": {...}}), handed to
        the template as given, as transformers hands over dicts."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=None, **self.special_tokens)
        except Exception as e:  # a template's raise_exception or a message it cannot take: the caller's fault
            raise RequestError(f"chat template: {e}", "messages") from e


def missing_template(hint: str = "pass chat_template=") -> RequestError:
    """The one message for a model without a chat template; hint says how the caller can give one."""
    return RequestError("the model has no chat template (none in its tokenizer_config.json or chat_template.jinja): "
                        + hint, "messages", "chat_template_missing")


def read_template_arg(value: str) -> str:
    """--chat-template FILE|STRING: a file's text, else the string itself."""
    p = Path(value)
    return p.read_text() if len(value) < 4096 and p.is_file() else value


# The template chat fine-tuning writes for a model that has none: ChatML's layout, with the
# tokenizer's EOS closing each turn, so the engine and transformers' generate stop at the end of
# a reply without a token the vocabulary lacks.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def assistant_spans(template: ChatTemplate, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: each span is
    what the assistant message adds after the template's generation prompt (its content and the
    template's end-of-turn text), so training on exactly those characters teaches the model what
    the engine asks of it at inference."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[:i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template renders a conversation's beginning differently from the whole "
                             "conversation (it rewrites earlier turns), so its assistant turns cannot be marked")
        # whitespace a template puts between turns is never generated (the answer ends at its
        # end-of-turn token), so it carries no loss
        spans.append((len(before), len(upto.rstrip())))
    return text, spans
