"""Pydantic request models of the OpenAI API subset the server speaks, and the error body.

Responses are plain dicts (built by the endpoints): they are only ever serialized, and the
official client is the schema check in the tests.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

MAX_N = 128          # OpenAI's own cap on n
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_LEN = 1024  # characters of one stop string: the stream holds back up to this much text
MAX_STOP_TOKEN_IDS = 1024
MAX_BIAS_ENTRIES = 300   # OpenAI's own cap on logit_bias
MAX_PROMPTS = 256
MAX_MESSAGES = 4096
MAX_SEQS_PER_REQUEST = 256   # prompts x n: a bound so one request cannot flood the queue
INT64 = 2**63 - 1

# Every field a request may carry is declared on its model (extra="forbid"): an unknown one is a 400
# naming it, as OpenAI answers. Of the fields OpenAI defines, these change nothing here and are accepted
# (they identify, store, route or bill a request; the prefix cache needs no key):
#   both endpoints: user, stream_options.include_obfuscation, stream_options without stream
#   chat: metadata, store, service_tier, safety_identifier, prompt_cache_key
# The ones the engine does not implement are a 400 naming them, unless set to what asks for nothing:
UNSUPPORTED = {
    "suffix": (None, ""),                       # completions; best_of: accepted only when it equals n
    "functions": (None, []),   # the legacy form of tools
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,),
}
# response_format (both endpoints): text, json_object and json_schema (ResponseFormat).
# vLLM's extensions this server implements: top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos,
# min_tokens, prompt_logprobs, structured_outputs, add_generation_prompt (chat); any other is unknown, so a 400.
# tools, tool_choice and parallel_tool_calls (chat): api/tools.py.


def refuse(v, info):
    """A field the server does not implement: a 400 naming it when it asks for anything."""
    if any(v == ok and type(v) is type(ok) for ok in UNSUPPORTED[info.field_name]):
        return None
    raise ValueError(f"{info.field_name} is not supported")


def _refusing(*names):
    return field_validator(*names)(classmethod(lambda cls, v, info: refuse(v, info)))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool = True   # OpenAI's padding against length side channels: none here


class JsonSchemaFormat(Strict):
    """OpenAI's response_format.json_schema. strict: the output always follows the schema here."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: Optional[str] = None
    json_schema: Union[dict, bool] = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: Optional[bool] = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type json_schema")
        return self

    def structured_outputs(self) -> dict | None:
        if self.type == "json_object":
            return {"json": {"type": "object"}}
        if self.type == "json_schema":
            return {"json": self.json_schema.json_schema}
        return None


class StructuredOutputsRequest(Strict):
    """vLLM's structured_outputs request object: one of json (a schema), regex, choice, grammar."""
    json_: Any = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None

    def fields(self) -> dict:
        return {k: v for k, v in dict(json=self.json_, regex=self.regex, choice=self.choice,
                                      grammar=self.grammar).items() if v is not None}


class SamplingFields(Strict):
    """Fields shared by both endpoints. Only the server's own bounds are checked here; what
    SamplingParams checks (core/sampling_params.py) it checks, once; unknown fields are 400s."""

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, le=2.0)          # OpenAI's cap
    top_p: float = 1.0
    top_k: int = Field(-1, le=INT64)  # the sampler puts it in an int64 tensor: beyond, the engine loop dies
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = Field(1.0, le=10.0)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = Field(None, ge=-INT64 - 1, le=INT64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False          # vLLM's extension: benchmarks need fixed output lengths
    logit_bias: Optional[dict[str, float]] = None
    min_tokens: int = 0               # vLLM's extension
    # vLLM's extension: per prompt token its logprob and the top-N (the response's prompt_logprobs);
    # a negative one is the engine's 400 (SamplingParams), naming it
    prompt_logprobs: Optional[int] = Field(None, le=MAX_LOGPROBS)
    user: Optional[str] = None        # accepted, changes nothing (the note above UNSUPPORTED)
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsRequest] = None   # vLLM's extension

    @model_validator(mode="after")
    def _one_constraint(self):
        rf = self.response_format.structured_outputs() if self.response_format is not None else None
        if rf is not None and self.structured_outputs is not None:
            raise ValueError("give either response_format (json_object, json_schema) or structured_outputs, not both")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_LEN} characters")
        return [s for s in stops if s] or None  # an empty stop string would end every output at once

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v):
        if v is None:
            return None
        if len(v) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        return list(dict.fromkeys(v))  # a set (in order): repeats add nothing but work

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v and len(v) > MAX_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_BIAS_ENTRIES} logit_bias entries")
        return v or None  # ids and values: SamplingParams; ids against the vocabulary: the intake

    SAMPLING: ClassVar[tuple[str, ...]] = (
        "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "stop", "stop_token_ids", "seed", "ignore_eos", "logit_bias", "min_tokens",
        "prompt_logprobs")

    def sampling_fields(self) -> dict:
        """The SamplingParams fields this request set (the engine's intake defaults the rest);
        top_k 0 means none, as in OpenAI-style clients."""
        fields = {k: getattr(self, k) for k in self.SAMPLING if k in self.model_fields_set}
        if fields.get("top_k") == 0:
            fields["top_k"] = -1
        # as a dict: SamplingParams checks it (exactly one of its fields), the intake compiles it
        so = self.structured_outputs.fields() if self.structured_outputs is not None else \
            self.response_format.structured_outputs() if self.response_format is not None else None
        if so is not None:
            fields["structured_outputs"] = so
        return fields

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """echo with logprobs scores the prompt too (its logprobs lead the choice's, the first null, as
    OpenAI's legacy API and vLLM answer); echo with max_tokens 0 returns only the scored prompt."""
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked below for a one-line error
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        def is_ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        if isinstance(v, str) or (is_ids(v) and v):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(p, str) or is_ids(p) for p in v):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of token-id lists")
        if not v or any(len(p) == 0 for p in v):
            raise ValueError("prompt must not be empty")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v  # always a list of prompts, each a str or a list of token ids

    _suffix = _refusing("suffix")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):  # best_of == n asks for nothing more
            raise ValueError("best_of is not supported (only best_of equal to n)")
        return None

    @model_validator(mode="after")
    def _checks(self):
        if len(self.prompt) * self.n > MAX_SEQS_PER_REQUEST:
            raise ValueError(f"{len(self.prompt)} prompts x n={self.n} is over the limit of "
                             f"{MAX_SEQS_PER_REQUEST} sequences per request")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: Optional[Union[str, dict[str, Any]]] = None   # OpenAI sends a JSON string


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, reasoning, ... reach the template as-is

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None   # null in an assistant's tool-call message
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDefinition(Strict):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None   # a JSON schema
    strict: Optional[bool] = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    # accepted, change nothing here
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    # tool calling (api/tools.py); tool_choice defaults to "auto" when tools are given, as OpenAI's and vLLM's
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None   # false: at most one call
    # not implemented: refused unless they ask for nothing (UNSUPPORTED)
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    _unsupported = _refusing(*(k for k in UNSUPPORTED if k != "suffix"))

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_form(cls, v):
        # one message naming the field, not pydantic's one per member of the union
        if v is None or v in ("none", "auto", "required") or isinstance(v, NamedToolChoice):
            return v
        try:
            return NamedToolChoice.model_validate(v)
        except ValueError:
            raise ValueError('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}') from None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v, info):
        tools = info.data.get("tools")
        if tools is None and "tools" not in info.data:
            return v                    # tools itself was refused: its error says why
        if v == "required" or isinstance(v, NamedToolChoice):
            if not tools:
                raise ValueError("tool_choice needs tools")
            if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
                raise ValueError(f"tool_choice names function {v.function.name!r}, which is not in tools")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
            self.model_fields_set.add("max_tokens")
        return self


class TokenizeRequest(Strict):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered by the chat template."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: Optional[list[Tool]] = None   # with messages: rendered as the chat endpoint renders them
    add_generation_prompt: bool = True
    # default: the tokenizer's BOS for a prompt; none for messages (the rendered template writes its own)
    add_special_tokens: Optional[bool] = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(Strict):
    """vLLM's POST /detokenize."""
    model: Optional[str] = None
    tokens: list[StrictInt]   # ids against the vocabulary: the endpoint (it knows the vocabulary)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body (OpenAI's shape); documented in /openapi.json."""
    error: ErrorDetail


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": _utf8(message), "type": type_, "param": _utf8(param), "code": code}}


def _utf8(s: str | None) -> str | None:
    # messages and params echo client input (a model name, a dict key), which JSON's "\ud800"
    # can make a lone surrogate: the response's UTF-8 encoding would then fail with a 500
    return s if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")
