"""Llama 3.1's JSON tool calls: the output is {"name": ..., "parameters": {...}} (optionally after
<|python_tag|>, several joined by ";"), as vLLM's llama3_json reads it. An output that does not
start so is content; one that does but does not parse is content too, whole."""
from __future__ import annotations

import json

from .base import Parsed, ToolParser, call_of, register

TAG = "<|python_tag|>"
_decoder = json.JSONDecoder()


@register("llama3_json")
class Llama3JsonToolParser(ToolParser):
    def parse(self, text: str, final: bool = True) -> Parsed:
        s = text.lstrip()
        if s.startswith(TAG):
            s = s[len(TAG):].lstrip()
        elif TAG.startswith(s):
            s = ""                      # blank, or the tag arriving: undecided
        if s and not s.startswith("{"):
            return Parsed(text, [])
        if not final:
            return Parsed("", [])       # a call being written: settled at the end
        calls, i = [], 0
        while True:
            try:
                obj, i = _decoder.raw_decode(s, i)
            except ValueError:
                return Parsed(text, [])
            call = call_of(obj)
            if call is None:
                return Parsed(text, [])
            calls.append(call)
            rest = s[i:].lstrip()
            if not (rest.startswith(";") and rest[1:].lstrip().startswith("{")):
                return Parsed(s[i:], calls)
            i = len(s) - len(rest[1:].lstrip())
