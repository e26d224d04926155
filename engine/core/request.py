"""A request's life beside the scheduler's Sequence: its checks, its text, when it ends, and
the RequestOutput it hands back. No torch here.

    checks (once, before the engine takes it)  ->  Request(seq, detokenizer)
    each step: the scheduler appends a token   ->  check_stop(req) -> None | "stop" | "length"
    streamed: req.output(new ids) every step; otherwise once, when finished
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine refuses; the server answers it with 400 and these fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


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


# ---------------------------------------------------------------- text

class StopMatcher:
    """Where a stop string ends in a growing text, fed only the new characters: one KMP
    automaton per stop string, so each step costs O(new text), whatever the stop strings' length
    and the text's. Its states also say how much of the text's end could still grow into a stop
    string (held back from a stream)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fail = [_failure(s) for s in stops]
        self.state = [0] * len(stops)    # per stop: longest prefix of it that ends the text

    def feed(self, text: str, start: int) -> int | None:
        """Advance over text[start:]; the index where the earliest-starting stop string that ends
        within it begins, or None."""
        hit = None
        for j, (s, fail) in enumerate(zip(self.stops, self.fail)):
            k, n = self.state[j], len(s)
            for i in range(start, len(text)):
                c = text[i]
                while k and s[k] != c:
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
                if k == n:
                    begin = i - n + 1
                    hit = begin if hit is None else min(hit, begin)
                    k = fail[k - 1]
                    break
            self.state[j] = k
        return hit

    @property
    def pending(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop string."""
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP failure function: f[i] = length of the longest proper border of s[:i + 1]."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class Detokenizer:
    """Incremental text of one request: prefix/read offsets (vLLM-style) so each step decodes
    a few tokens, not the whole output; a stop string cuts the text; text that may be the start
    of a stop string (or an incomplete UTF-8 character) is held back from the stream."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.matcher = StopMatcher(stop) if stop else None
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""
        self.emitted = 0

    def push(self, ids: list[int]) -> bool:
        """Add tokens; True when a stop string appeared (the text is cut before it). Only the new
        text is searched."""
        self.ids.extend(ids)
        before = len(self.text)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.text += full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.matcher is not None and len(self.text) > before:
            hit = self.matcher.feed(self.text, before)
            if hit is not None:
                self.text = self.text[:hit]
                return True
        return False

    def flush(self) -> None:
        """At the end: whatever is still pending (an incomplete character) becomes text."""
        if self.read < len(self.ids):
            prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
            self.text += self.tok.decode(self.ids[self.prefix:])[len(prefix_text):]
            self.read = len(self.ids)

    def delta(self, finished: bool) -> str:
        safe = len(self.text)
        if not finished and self.matcher is not None:  # hold back a suffix that could grow into a stop string
            safe -= self.matcher.pending
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out


# ---------------------------------------------------------------- outputs

@dataclass
class RequestOutput:
    """A request's state. From LLM.generate: the final result. Streamed (LLM.step, AsyncLLM):
    one per step with the step's delta (new_*) plus everything so far (token_ids, text)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated ids only
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None                     # None | "stop" | "length"
    logprobs: list[dict[int, float]] | None = None       # per generated token: {token_id: logprob} (chosen + top-N)
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, float]] | None = None


class Request:
    """What the engine keeps per request beside the scheduler's Sequence."""
    __slots__ = ("seq", "prompt", "detok", "stream", "stop_ids", "logprobs", "tokenizer")

    def __init__(self, seq, prompt: str | None, tokenizer, eos_token_ids, stream: bool):
        p = seq.params
        self.seq, self.prompt, self.stream, self.tokenizer = seq, prompt, stream, tokenizer
        # ids that end the request with "stop" and add no text
        self.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(eos_token_ids))
        # text is built step by step only where it is read step by step: streams and stop strings
        self.detok = Detokenizer(tokenizer, p.stop) if tokenizer is not None and (stream or p.stop) else None
        self.logprobs: list | None = None

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    def text(self) -> str:
        if self.detok is not None:
            return self.detok.text
        if self.tokenizer is None:
            return ""
        ids = self.seq.output_token_ids
        if self.seq.finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]  # eos / stop token: not part of the text
        return self.tokenizer.decode(ids)

    def output(self, new_token_ids: list[int] = (), new_logprobs: list | None = None) -> RequestOutput:
        seq = self.seq
        fin = seq.finish_reason is not None and seq.finish_reason != "abort"
        out = RequestOutput(seq.request_id, self.prompt, seq.prompt_token_ids, list(seq.output_token_ids),
                            self.text(), fin, seq.finish_reason if fin else None, self.logprobs,
                            list(new_token_ids), "", new_logprobs)
        if self.detok is not None and self.stream:
            out.new_text = self.detok.delta(fin)
            if not fin:
                out.text = self.detok.text[:self.detok.emitted]
        return out


def check_stop(req: Request, max_model_len: int) -> str | None:
    """The one place that decides whether a request is done after its newest token, and why:
    a stop or eos token, a stop string, max_tokens or the context length."""
    seq = req.seq
    tok = seq.token_ids[-1]
    if tok in req.stop_ids:
        if req.detok is not None:
            req.detok.flush()
        return "stop"
    if req.detok is not None and req.detok.push([tok]):
        return "stop"
    total = len(seq.token_ids)
    if total - seq.num_prompt_tokens >= seq.params.max_tokens or total >= max_model_len:
        if req.detok is not None:
            req.detok.flush()
        return "length"
    return None
