"""SamplingParams: what a request asks of the sampler (vLLM's names and ranges). No torch here;
the sampler that applies them is worker/sampler.py."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

from .request import RequestError
from .structured import StructuredOutputsParams

GREEDY_EPS = 1e-5   # a temperature below this is greedy


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None           # vLLM's: per prompt token its logprob and the top-N
    logit_bias: dict[int, float] | None = None   # OpenAI's: {token_id: bias in [-100, 100]} added to the logits
    min_tokens: int = 0                          # vLLM's: no EOS or stop token id before this many tokens
    # vLLM's: the output follows a JSON schema, regex, choice or grammar (core/structured.py); a dict
    # with those fields is taken too
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        def bad(msg):  # the message starts with the field's name: the server's 400 names it as param
            raise RequestError(msg, msg.split(" ", 1)[0])
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Real):
                bad(f"{name} must be a number, got {getattr(self, name)!r}")
        if not self.temperature >= 0.0:  # also catches NaN
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (isinstance(self.prompt_logprobs, bool)
                                                 or not isinstance(self.prompt_logprobs, int)
                                                 or self.prompt_logprobs < 0):
            bad(f"prompt_logprobs must be an integer >= 0, got {self.prompt_logprobs!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        self.logit_bias = _logit_bias(self.logit_bias, bad) or None
        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if self.structured_outputs is not None and self.min_tokens:
            # a grammar that ends before min_tokens would leave no token to draw: the grammar decides the end
            bad("min_tokens cannot be combined with structured_outputs (the grammar decides where the output ends)")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


LOGIT_BIAS_MAX = 100.0


def _logit_bias(bias, bad) -> dict[int, float]:
    """{token_id: bias} with int ids; JSON's string keys ("50256") are taken as OpenAI sends them.
    Ids against the vocabulary: the intake's check (it knows the vocabulary)."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        bad(f"logit_bias must be a mapping of token ids to biases, got {type(bias).__name__}")
    out = {}
    for k, v in bias.items():
        try:
            if isinstance(k, bool):
                raise TypeError
            if isinstance(k, str) and not (k.isascii() and k.isdigit()):  # int() would take " 5", "1_0"
                raise ValueError
            t = int(k) if isinstance(k, str) else operator.index(k)
        except (TypeError, ValueError):
            bad(f"logit_bias keys must be token ids (integers), got {k!r}")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or not -LOGIT_BIAS_MAX <= v <= LOGIT_BIAS_MAX:
            bad(f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {k!r}")
        out[t] = float(v)
    return out
