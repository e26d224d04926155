"""Tool calling on /v1/chat/completions, as vLLM serves it: which parser reads a request's output, the
JSON schema a forced call ("required" or a named function) must match, and the messages as chat
templates expect them."""
from __future__ import annotations

import json

from .errors import APIError
from .tool_parsers import ForcedToolParser, ToolParser, tool_parser


def tool_call_schema(tools: list[dict], tool_choice) -> dict:
    """The JSON schema of a forced output. A named function ({"type": "function", "function": {"name"}}):
    {"name": that name, "arguments": its parameters}. "required": a non-empty list of such calls, each
    any of the tools (vLLM's shape, so parallel calls stay possible). The structured-outputs path
    constrains generation to it; ForcedToolParser reads what it produces."""
    def call(fn: dict) -> dict:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"type": "string", "const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}
    fns = [t["function"] for t in tools]
    if tool_choice == "required":
        return {"type": "array", "minItems": 1, "items": {"anyOf": [call(f) for f in fns]}}
    name = tool_choice["function"]["name"]
    return call(next(f for f in fns if f["name"] == name))


def parser_for(st, req) -> ToolParser | None:
    """The parser of a request's output: None when the output is plain content (no tools, or tool_choice
    "none"). "auto" needs the server's --enable-auto-tool-choice and --tool-call-parser (vLLM's 400)."""
    if not req.tools or req.tool_choice == "none":
        return None
    if req.tool_choice == "auto":
        if not st.tool_call_parser:
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                "to be set", param="tool_choice")
        return tool_parser(st.tool_call_parser)
    # the sampler holds the output to tool_call_schema (forced_constraint): the parser reads that JSON
    return ForcedToolParser()


def forced_constraint(req) -> dict | None:
    """tool_choice "required" or a named function: the SamplingParams fields that make the model write the
    call(s), structured outputs over tool_call_schema (as vLLM enforces them, whatever the model)."""
    if not req.tools or req.tool_choice in (None, "none", "auto"):
        return None
    if "structured_outputs" in req.sampling_fields():
        raise APIError(400, "tool_choice \"required\" or a named function constrains the output itself: give no "
                            "response_format or structured_outputs with it", param="tool_choice")
    choice = req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()
    return {"structured_outputs": {"json": tool_call_schema(tools_json(req), choice)}}


def template_messages(req) -> list[dict]:
    """The request's messages as chat templates take them (and vLLM hands them over): content as text,
    and an assistant's tool-call arguments as objects, not the JSON strings OpenAI's format carries."""
    out = []
    for i, m in enumerate(req.messages):
        d = {**m.model_dump(exclude_none=True), "content": m.text()}
        for j, tc in enumerate(d.get("tool_calls") or []):
            fn = tc["function"]
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise APIError(400, "arguments is not valid JSON",
                                   param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
            elif args is None:
                fn["arguments"] = {}
        out.append(d)
    return out


def tools_json(req) -> list[dict] | None:
    """The tools as the client sent them (the template shows them to the model as given)."""
    return None if req.tools is None else [t.model_dump(exclude_unset=True) for t in req.tools]
