"""Chat templates rendered as transformers' apply_chat_template renders them: the model's jinja
template (chat_template.jinja or tokenizer_config.json) in a sandboxed environment with what hub
templates use (raise_exception, strftime_now, tojson, loop controls, {% generation %} blocks,
the tokenizer's special tokens). A model without a template has none: no format is guessed.

A template comes with the model directory, so it may be hostile: besides the sandbox (no attribute
access to internals, no mutation of the caller's data), a render has a time limit (checked at every
loop iteration and every call, macros included) and a size limit (on the output as it is produced,
on repeated strings and on the values a namespace stores), so a template that loops for ever or
builds a huge string is a RequestError, not a hung or exhausted server."""
from __future__ import annotations

import functools
import json
import operator
import threading
import time
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .core.request import RequestError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# a render's limits: well past any real conversation (the server takes bodies up to 16 MiB), far
# below what hangs or exhausts a server
RENDER_SECONDS = 10.0
RENDER_CHARS = 32 << 20


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


class _TooLong(Exception):
    """A render over its time or size limit."""


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox with a render's limits. Every for loop's iterable is wrapped in guard() and every
    call (macros included) checks the clock, so no loop or recursion runs past the deadline; `*` and
    `**` are checked before they compute (they are also what jinja would fold at compile time, as
    `"x" * 10**9`); a call or a filter takes no int argument over the size limit (the widths of
    center, indent, ljust, ...); a namespace stores no value over it."""
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
        self.max_chars = max_chars
        self.render_state = threading.local()  # the deadline of the render running in this thread
        self.filters["tojson"] = _tojson
        self.filters = {name: self._sized_filter(f) for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            namespace=self._namespace())

    def check_args(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and abs(a) > self.max_chars:
                raise _TooLong(f"passes {a}, over the size limit of {self.max_chars}")

    def _sized_filter(self, f):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
        def sized(*args, **kwargs):
            self.check_args(args[1:], kwargs)  # the filtered value itself may be any number
            return f(*args, **kwargs)
        return sized

    def guarded(self, source: str):
        """The compiled template, its loops' iterables wrapped in guard (an environment attribute: a
        template cannot rebind it)."""
        tree = self.parse(source)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("guard"), [loop.iter], [], None, None)
        return self.from_string(tree)

    def check_clock(self) -> None:
        end = getattr(self.render_state, "end", None)
        if end is not None and time.monotonic() > end:
            raise _TooLong(f"took more than {self.render_state.seconds:g} s")

    def guard(self, iterable):
        for x in iterable:
            self.check_clock()
            yield x

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        __self.check_clock()
        __self.check_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, op, left, right):
        if op == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                raise _TooLong(f"repeats a value to {len(seq) * n} items (limit {self.max_chars})")
            return operator.mul(left, right)
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise _TooLong(f"computes {left} ** {right}, over the limit of 4096 bits")
        return operator.pow(left, right)

    def _namespace(self):
        max_chars = self.max_chars

        class _Namespace(Namespace):  # what `{% set ns.s = ns.s ~ ns.s %}` in a loop would grow without it
            def __setitem__(self, name, value):
                if isinstance(value, (str, list, tuple)) and len(value) > max_chars:
                    raise _TooLong(f"stores a value of {len(value)} items (limit {max_chars})")
                super().__setitem__(name, value)
        return _Namespace


class ChatTemplate:
    """max_seconds / max_chars: a render's limits (see the module docstring)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
                 max_seconds: float = RENDER_SECONDS, max_chars: int = RENDER_CHARS):
        if not source:
            raise ValueError("a chat template needs its jinja source")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.max_seconds, self.max_chars = max_seconds, max_chars
        try:
            self._template = _Environment(max_chars).guarded(source)
        except (_TooLong, TemplateSyntaxError) as e:
            raise ValueError(f"chat template: {e}") from None

    @classmethod
    def of_tokenizer(cls, tokenizer, source: str | None = None) -> "ChatTemplate | None":
        """source (or the tokenizer's own template) with the tokenizer's special tokens; None without a template."""
        own = not source
        source = source or getattr(tokenizer, "chat_template", None)
        if not source:
            return None
        try:
            return cls(source, {k: getattr(tokenizer, k, None) for k in SPECIAL_TOKENS})
        except ValueError as e:
            if own:  # the model directory's: say which files hold it
                raise ValueError(f"{e} (the tokenizer's, from tokenizer_config.json or chat_template.jinja)") from None
            raise

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """tools: JSON-schema function definitions ({"type": "function", "function": {...}}), handed to
        the template as given, as transformers hands over dicts."""
        parts, size = [], 0
        state = self._template.environment.render_state
        state.end, state.seconds = time.monotonic() + self.max_seconds, self.max_seconds
        try:
            for part in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=tools, documents=None, **self.special_tokens):
                size += len(part)
                if size > self.max_chars:
                    raise _TooLong(f"renders more than its limit of {self.max_chars} characters")
                parts.append(part)
        except _TooLong as e:
            raise RequestError(f"chat template: the render {e}", "messages", "chat_template_limit") from None
        except Exception as e:  # a template's raise_exception or a message it cannot take: the caller's fault
            raise RequestError(f"chat template: {e}", "messages") from e
        return "".join(parts)


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
