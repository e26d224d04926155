"""Intake: a request is defaulted, tokenized and checked here, once, into a PreparedRequest
that the engine takes as it is. No torch here.

    prompt (text | token ids) + sampling (SamplingParams | the fields a caller set)
        -> Intake.prepare -> PreparedRequest(prompt, prompt_token_ids, params)

Every caller (LLM.generate, LLM.chat, the server's endpoints, the terminal chat) goes through
prepare; generation_config.json's defaults are applied in one place (Intake.sampling_params).
"""
from __future__ import annotations

import operator
from concurrent.futures import Future
from dataclasses import dataclass

from .lora import LoRARequest
from .request import RequestError
from .sampling_params import SamplingParams
from .structured import StructuredOutputsParams


@dataclass(frozen=True)
class PreparedRequest:
    """A request the engine has checked: its ids fit the vocabulary, the context and the KV pool."""
    prompt: str | None               # the text, when the caller gave text
    prompt_token_ids: list[int]
    params: SamplingParams
    grammar: Future | None = None    # structured outputs: the template matcher, compiling (core/structured.py)
    lora: LoRARequest | None = None  # the LoRA adapter it runs with (checked by the engine: LLM.prepare)


# ---------------------------------------------------------------- checks (each message once)

def check_token_ids(ids, vocab_size: int, param: str = "prompt") -> list[int]:
    """ids as a list of Python ints (numpy and torch integers welcome), each in the vocabulary."""
    try:
        if any(isinstance(t, bool) for t in ids):
            raise TypeError
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise RequestError("token ids must be integers", param) from None
    if not ids:
        raise RequestError(f"{param} must not be empty", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is out of range [0, {vocab_size})", param)
    return ids


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> None:
    bad = next((t for t in bias or () if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"logit_bias: token id {bad} is out of range [0, {vocab_size})", "logit_bias")


def check_context(num_prompt: int, max_tokens: int, max_model_len: int) -> None:
    if max_tokens < 1 or num_prompt + max_tokens > max_model_len:
        want = max(max_tokens, 1)
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                           f"{num_prompt + want} tokens ({num_prompt} in the prompt, {want} for the completion). "
                           f"Please reduce the prompt or max_tokens.", "max_tokens", "context_length_exceeded")


def check_pool(num_tokens: int, num_blocks: int, block_size: int) -> None:
    """A sequence longer than the whole KV pool would preempt itself forever."""
    if -(-num_tokens // block_size) > num_blocks:
        raise RequestError(f"a sequence of up to {num_tokens} tokens can never fit the KV cache ({num_blocks} "
                           f"blocks of {block_size}); lower max_tokens", "max_tokens", "kv_cache_too_small")


class Intake:
    """The engine's request checks against its model (vocabulary, context) and KV pool
    (block_manager: held_tokens(n), capacity, block_size)."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, block_manager, defaults: dict | None = None,
                 grammars=None):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.bm = block_manager
        self.defaults = dict(defaults or {})   # generation_config.json's SamplingParams fields
        self.grammars = grammars               # structured.Grammars: compiles and caches constraints

    def sampling_params(self, fields: dict, prompt_len: int, default_max_tokens: int | None = None) -> SamplingParams:
        """SamplingParams from the fields a caller set; what it leaves unset comes from the model
        directory's generation_config.json, then SamplingParams' own defaults. An unset max_tokens
        is the model's default (else default_max_tokens) cut to what is left of the context, else
        all of it."""
        given = {k: v for k, v in fields.items() if v is not None}
        if "max_tokens" not in given:
            room = max(self.max_model_len - prompt_len, 1)
            default = self.defaults.get("max_tokens", default_max_tokens)
            given["max_tokens"] = min(default or room, room)
        try:
            return SamplingParams(**{**self.defaults, **given})
        except TypeError as e:
            raise RequestError(str(e)) from None

    def compile_ahead(self, structured_outputs) -> Future | None:
        """Start a constraint (StructuredOutputsParams or its fields) compiling on the grammar thread now,
        so that it overlaps what comes before the request's forward (rendering, tokenizing); -> its Future.
        One the intake refuses is left for prepare to report (None)."""
        if structured_outputs is None or self.grammars is None:
            return None
        try:
            return self.grammars.submit(StructuredOutputsParams.of(structured_outputs))
        except RequestError:
            return None

    def prepare(self, prompt, sampling: SamplingParams | dict | None = None, *, add_special_tokens: bool = True,
                default_max_tokens: int | None = None, param: str = "prompt") -> PreparedRequest:
        """prompt: text (tokenized here, with the tokenizer's BOS unless add_special_tokens=False, as
        for rendered chat) or token ids. sampling: a SamplingParams taken as it is, or the fields the
        caller set (a dict; None: none), defaulted by sampling_params. RequestError (a ValueError)
        names what is wrong."""
        grammar = self.compile_ahead(sampling.structured_outputs if isinstance(sampling, SamplingParams) else
                                     (sampling or {}).get("structured_outputs"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer (no tokenizer.json with the model): "
                                   "pass token-id lists or tokenizer=", param)
            try:  # JSON's "\ud800" decodes to a lone surrogate, on which the tokenizer raises TypeError
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"{param} is not valid Unicode: {e.reason}", param) from None
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif hasattr(prompt, "__iter__"):  # token ids: a list, a tuple, an array
            text, ids = None, prompt
        else:
            raise RequestError(f"{param} must be text or a list of token ids, got {type(prompt).__name__}", param)
        ids = check_token_ids(ids, self.vocab_size, param)
        params = sampling if isinstance(sampling, SamplingParams) else \
            self.sampling_params(sampling or {}, len(ids), default_max_tokens)
        check_context(len(ids), params.max_tokens, self.max_model_len)
        bm = self.bm
        check_pool(bm.held_tokens(len(ids) + params.max_tokens), bm.capacity, bm.block_size)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer", "stop")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.vocab_size:
                raise RequestError(f"{name} ({k}) exceeds the vocabulary size ({self.vocab_size})", name)
        check_logit_bias(params.logit_bias, self.vocab_size)
        # the spec's limits are checked here (submitted ahead, it passed them); it compiles on the grammar thread
        # meanwhile (the prefill need not wait)
        if params.structured_outputs is None:
            grammar = None
        elif self.grammars is None:
            raise RequestError("structured outputs are not available with this engine", "structured_outputs")
        elif grammar is None:
            grammar = self.grammars.submit(params.structured_outputs)
        return PreparedRequest(text, ids, params, grammar)
