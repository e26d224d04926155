"""What every tool-call parser shares: the parse contract, the registry, the streamer that turns
parses of a growing text into OpenAI's deltas, and the parser of a forced ("required" or named) call."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

_REGISTRY: dict[str, type["ToolParser"]] = {}


@dataclass
class ToolCall:
    name: str
    arguments: str                      # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def json(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: str                        # the text outside the calls, in order
    calls: list[ToolCall]


class ToolParser:
    """parse(text, final): the calls in a model's text and the text around them. Not final, only what
    is settled: content that cannot become part of a call, and calls whose text is closed; so a later
    parse of a longer text only appends to both (the streamer relies on that), and the last parse
    equals the parse of the whole output (a stream accumulates to the non-streamed answer).
    A call whose JSON does not parse stays in the content as the model wrote it."""
    name: str = ""

    def parse(self, text: str, final: bool = True) -> Parsed:
        raise NotImplementedError


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def tool_parsers() -> list[str]:
    return sorted(_REGISTRY)


def tool_parser(name: str) -> ToolParser:
    if name not in _REGISTRY:
        raise ValueError(f"unknown tool-call parser {name!r}; one of: {', '.join(tool_parsers())}")
    return _REGISTRY[name]()


def call_of(obj) -> ToolCall | None:
    """{"name": str, "arguments" | "parameters": object} -> a ToolCall; anything else None. Llama 3.1
    writes "parameters", Hermes and the forced schema "arguments"."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):   # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def held_prefix(text: str, tag: str) -> int:
    """How many characters at text's end could be the start of tag (held back from a stream)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ForcedToolParser(ToolParser):
    """tool_choice "required" or a named function: the whole output is the call, one object
    {"name", "arguments"} or a list of them (tool_call_schema's shapes); nothing settles before the end."""
    name = "forced"

    def parse(self, text: str, final: bool = True) -> Parsed:
        if not final:
            return Parsed("", [])
        try:
            obj = json.loads(text)
        except ValueError:
            return Parsed(text, [])
        calls = [call_of(o) for o in (obj if isinstance(obj, list) else [obj])]
        if not calls or None in calls:
            return Parsed(text, [])
        return Parsed("", calls)


class ToolStreamer:
    """One choice's stream: feed each engine delta, get the new content and the newly closed calls.
    Content is held while it is blank (a non-streamed answer with only blank text around its calls
    has content null), then sent whole from its start."""

    def __init__(self, parser: ToolParser):
        self.parser, self.text, self.sent, self.calls = parser, "", 0, 0

    def feed(self, new_text: str, final: bool) -> tuple[str, list[ToolCall]]:
        self.text += new_text
        p = self.parser.parse(self.text, final)
        content = ""
        if p.content.strip():
            content, self.sent = p.content[self.sent:], len(p.content)
        new, self.calls = p.calls[self.calls:], len(p.calls)
        return content, new
