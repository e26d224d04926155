"""Hermes / Qwen2.5 tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number,
anywhere in the text. A call the output ends inside (no closing tag) counts at the end, as vLLM reads it."""
from __future__ import annotations

import json

from .base import Parsed, ToolParser, call_of, held_prefix, register

START, END = "<tool_call>", "</tool_call>"


@register("hermes")
class HermesToolParser(ToolParser):
    def parse(self, text: str, final: bool = True) -> Parsed:
        content, calls, pos = [], [], 0
        while True:
            i = text.find(START, pos)
            if i < 0:
                rest = text[pos:]
                content.append(rest if final else rest[:len(rest) - held_prefix(rest, START)])
                break
            content.append(text[pos:i])
            j = text.find(END, i + len(START))
            if j < 0 and not final:
                break                   # an open call: settled once it closes
            end = len(text) if j < 0 else j + len(END)
            try:
                call = call_of(json.loads(text[i + len(START):j if j >= 0 else len(text)]))
            except ValueError:
                call = None
            if call is None:
                content.append(text[i:end])
            else:
                calls.append(call)
            pos = end
        return Parsed("".join(content), calls)
