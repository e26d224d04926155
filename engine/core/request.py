"""A request's life in the engine: its text, when it ends, and the RequestOutput it hands
back. No torch here.

    intake.prepare (the checks, once)          ->  Request(seq, detokenizer)
    each step: the scheduler appends a token   ->  check_stop(req) -> None | "stop" | "length"
    streamed: req.output(new ids) every step; otherwise once, when finished
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .detokenizer import Detokenizer


class RequestError(ValueError):
    """A request the engine refuses; the server answers it with 400 and these fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class Overloaded(Exception):
    """The engine holds as many requests as it may (AsyncLLM.admit): retry later (a 429)."""


# ---------------------------------------------------------------- outputs

@dataclass
class RequestOutput:
    """What the engine hands back for a request. From LLM.generate: the final result. Streamed
    (LLM.step, AsyncLLM): one per step carrying the step's delta (new_*); the whole output
    (token_ids, text, logprobs) is filled in once, on the finished one."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated ids only (finished outputs)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None                     # None | "stop" | "length"
    logprobs: list[dict[int, float]] | None = None       # per generated token: {token_id: logprob} (chosen + top-N)
    # prompt_logprobs asked: per prompt token {token_id: logprob} (the prompt's token + top-N), the first
    # None (nothing precedes it); on the finished output and, streamed, on the first one
    prompt_logprobs: list[dict[int, float] | None] | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0                           # prompt tokens served from the prefix cache
    error: Exception | None = None                       # the engine dropped the request (its grammar failed)


class Request:
    """Everything the engine keeps per request: the scheduler's Sequence, the prompt text, the
    detokenizer, the stop ids, the logprobs so far and the structured-output matcher."""
    __slots__ = ("seq", "prompt", "detok", "stream", "stop_ids", "logprobs", "prompt_logprobs", "tokenizer",
                 "grammar", "matcher", "error")

    def __init__(self, seq, prompt: str | None, tokenizer, eos_token_ids, stream: bool, grammar=None):
        p = seq.params
        # structured outputs (core/structured.py): the Future of the compiled grammar, and this request's
        # own copy of it once it first samples; error: why the engine dropped it (its grammar failed)
        self.grammar, self.matcher, self.error = grammar, None, None
        self.seq, self.prompt, self.stream, self.tokenizer = seq, prompt, stream, tokenizer
        # ids that end the request with "stop" and add no text
        self.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(eos_token_ids))
        # text is built step by step only where it is read step by step: streams and stop strings
        self.detok = Detokenizer(tokenizer, p.stop) if tokenizer is not None and (stream or p.stop) else None
        self.logprobs: list | None = [] if p.logprobs is not None else None
        # params are duck-typed (the scheduler tests build them): no prompt_logprobs, none asked
        self.prompt_logprobs: list | None = [None] if getattr(p, "prompt_logprobs", None) is not None else None

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

    def output(self, new_token_ids: list[int], new_logprobs: list | None = None) -> RequestOutput:
        """The step's output: its delta, and when finished the whole of it (copied once)."""
        seq = self.seq
        fin = seq.finish_reason is not None and seq.finish_reason != "abort"
        out = RequestOutput(seq.request_id, self.prompt, seq.prompt_token_ids, finished=fin,
                            finish_reason=seq.finish_reason if fin else None, new_token_ids=new_token_ids,
                            new_logprobs=new_logprobs, error=self.error)
        if self.detok is not None and self.stream:
            out.new_text = self.detok.delta(fin)
        if self.prompt_logprobs is not None and (fin or (self.stream and seq.num_output_tokens == 1)):
            out.prompt_logprobs = list(self.prompt_logprobs)
        if fin:
            out.token_ids, out.text, out.logprobs = seq.output_token_ids, self.text(), self.logprobs
            # after a preemption the re-admission's hit may cover generated tokens too: prompt only
            out.num_cached_tokens = min(seq.num_cached_tokens, seq.num_prompt_tokens)
        return out


def check_stop(req: Request, max_model_len: int) -> str | None:
    """The one place that decides whether a request is done after its newest token, and why:
    a stop or eos token (not before min_tokens), a stop string, max_tokens or the context length."""
    seq = req.seq
    tok = seq.token_ids[-1]
    # min_tokens: the sampler bans stop ids before then; here the same rule decides the end
    if tok in req.stop_ids and seq.num_output_tokens > seq.params.min_tokens:
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
