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

from .request import RequestError

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

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except Exception as e:  # a template's raise_exception or a message it cannot take: the caller's fault
            raise RequestError(f"chat template: {e}", "messages") from e


def read_template_arg(value: str) -> str:
    """--chat-template FILE|STRING: a file's text, else the string itself."""
    p = Path(value)
    return p.read_text() if len(value) < 4096 and p.is_file() else value


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The chat template of an HF model directory, with its tokenizer's special tokens; None without one."""
    from .tokenizer import Tokenizer
    return ChatTemplate.of_tokenizer(Tokenizer.load(model_dir))
