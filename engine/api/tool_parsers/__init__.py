"""Tool-call parsers, registered by name (the names --tool-call-parser takes, as vLLM names them):
each turns a model's text into OpenAI tool calls and the text left around them."""
from __future__ import annotations

from .base import ForcedToolParser, Parsed, ToolCall, ToolParser, ToolStreamer, register, tool_parser, tool_parsers
from . import hermes, llama3_json  # noqa: F401  (they register themselves)

__all__ = ["ForcedToolParser", "Parsed", "ToolCall", "ToolParser", "ToolStreamer", "register", "tool_parser",
           "tool_parsers"]
