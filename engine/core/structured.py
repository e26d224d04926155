"""Structured outputs: a request's constraint (JSON schema, regex, choice, grammar) compiled by
llguidance into a token matcher; each step the matchers of the batch's constrained rows fill one
bitmask (S, ceil(V / 32)) that the sampler applies. No torch here (llguidance and numpy only).

    StructuredOutputsParams  -> Grammars.submit (the intake) -> a Future, compiled on the grammar thread
                             -> a template matcher (cached), deep-copied per request (Request.matcher)
    while it compiles: the request's prompt is computed but for its last token; the scheduler holds
               back the step that samples (Sequence.gate), and the other sequences go on
    each step: the runner issues the forward, then calls StructuredOutputs.bitmask(batch) and masks
               the logits (the mask work overlaps the forward on a GPU)
               StructuredOutputs.advance(req, token) after the token is appended

Preemption recomputes a sequence's KV but keeps its tokens, so its matcher (which has consumed
exactly those tokens) stays valid; a finished or aborted request drops its matcher with it.
"""
from __future__ import annotations

import json as _json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .request import RequestError

MAX_SPEC_CHARS = 64 * 1024   # a schema / regex / grammar's text
MAX_NESTING = 32             # JSON schema depth (objects and arrays inside each other)
MAX_CHOICES = 1024
CACHE_SIZE = 256

log = logging.getLogger("gpt_engine.core.structured")


@dataclass
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams (one of them): json (a JSON schema, as a dict or its text),
    regex, choice (a list of strings: the output is one of them), grammar (Lark / llguidance EBNF)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RequestError(f"structured_outputs needs exactly one of json, regex, choice, grammar; got "
                               f"{given or 'none'}", "structured_outputs")
        if self.json is not None and not isinstance(self.json, (dict, str, bool)):
            raise RequestError("structured_outputs.json must be a JSON schema (an object or its text)",
                               "structured_outputs")
        for k in ("regex", "grammar"):
            if getattr(self, k) is not None and not isinstance(getattr(self, k), str):
                raise RequestError(f"structured_outputs.{k} must be a string", "structured_outputs")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice \
                    or not all(isinstance(c, str) for c in self.choice):
                raise RequestError("structured_outputs.choice must be a non-empty list of strings",
                                   "structured_outputs")
            if len(self.choice) > MAX_CHOICES:
                raise RequestError(f"structured_outputs.choice: at most {MAX_CHOICES} choices", "structured_outputs")
            self.choice = list(self.choice)

    @classmethod
    def of(cls, v) -> "StructuredOutputsParams | None":
        """From a StructuredOutputsParams or the same fields as a dict (the server's request object)."""
        if v is None or isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            raise RequestError("structured_outputs must be an object with one of json, regex, choice, grammar",
                               "structured_outputs")
        unknown = set(v) - {"json", "regex", "choice", "grammar"}
        if unknown:
            raise RequestError(f"structured_outputs: unsupported field(s) {sorted(unknown)}", "structured_outputs")
        return cls(**v)


def _depth(x, limit: int) -> int:
    """How deep a parsed JSON value's objects and arrays nest (a scalar: 0), stopping once past limit. Level
    by level over the containers only: every request with a schema pays for this walk."""
    level, depth = [x] if isinstance(x, (dict, list)) else [], 0
    while level and depth <= limit:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list))]
    return depth


def grammar_spec(so: StructuredOutputsParams) -> tuple[str, str]:
    """-> (kind, text): the constraint as the cache key and the text llguidance compiles."""
    def bad(msg):
        raise RequestError(f"structured_outputs: {msg}", "structured_outputs", "invalid_grammar")
    if so.json is not None:
        schema = so.json
        if isinstance(schema, str):
            try:
                schema = _json.loads(schema)
            except ValueError as e:
                bad(f"json is not valid JSON: {e}")
        if not isinstance(schema, (dict, bool)):
            bad("json must be a JSON schema object")
        if schema is False:
            bad("the json schema false accepts no value")
        schema = {} if schema is True else schema  # any JSON value
        text = _json.dumps(schema, separators=(",", ":"))  # key order kept: it is the output's order
        kind = "json"
        if _depth(schema, MAX_NESTING) > MAX_NESTING:
            bad(f"json schema nests deeper than {MAX_NESTING} levels")
    elif so.choice is not None:
        # a regex alternation of the escaped choices: exactly one of them, nothing else
        kind, text = "regex", "(" + "|".join(_regex_escape(c) for c in so.choice) + ")"
    elif so.regex is not None:
        kind, text = "regex", so.regex
    else:
        kind, text = "grammar", so.grammar
    if len(text) > MAX_SPEC_CHARS:
        bad(f"the {kind} is {len(text)} characters, over the limit of {MAX_SPEC_CHARS}")
    return kind, text


def _regex_escape(s: str) -> str:
    # llguidance's regex syntax (Rust regex): escape every metacharacter
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in s)


class Grammars:
    """Compiles constraints against one tokenizer (the engine's) on one worker thread (llguidance
    releases the GIL), with an LRU cache of futures keyed by (kind, text): a constraint compiles once
    however many requests ask for it at the same time. Thread-safe: the server prepares requests on
    worker threads."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, list(eos_token_ids)
        self._ll_tokenizer = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.num_compiled = 0

    def ll_tokenizer(self):
        import llguidance
        if self._ll_tokenizer is None:
            if self.tokenizer is None:
                raise RequestError("structured outputs need a tokenizer (no tokenizer.json with the model)",
                                   "structured_outputs")
            # n_vocab: the model's rows; those past the tokenizer's vocabulary (padding) are never allowed
            self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend_json(), n_vocab=self.vocab_size,
                                                        eos_token=self.eos or None)
        return self._ll_tokenizer

    def submit(self, so: StructuredOutputsParams) -> Future:
        """-> a Future of (the template matcher, never advanced: each request deep-copies it; its first
        token mask, int32 words), or of the RequestError naming what does not compile. The spec's own
        limits raise here, at once."""
        key = grammar_spec(so)
        with self._lock:
            tok = self.ll_tokenizer()
            f = self._cache.get(key)
            if f is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="gpt-engine-grammar")
                f = self._cache[key] = self._pool.submit(self._build, tok, *key)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        return f

    def compile(self, so: StructuredOutputsParams):
        """(template matcher, first mask), waiting for the compile; RequestError names what does not compile."""
        return self.submit(so).result()

    def _build(self, tok, kind: str, text: str):
        import llguidance
        import numpy as np
        if kind == "json":
            # compact JSON (vLLM's default): a weak model cannot loop on blanks inside a structure
            g = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            g = llguidance.LLMatcher.grammar_from_regex(text)
        else:
            g = llguidance.LLMatcher.grammar_from_lark(text)
        m = llguidance.LLMatcher(tok, g, log_level=0)
        if m.is_error():
            raise RequestError(f"structured_outputs: the {kind} does not compile: {m.get_error()}",
                               "structured_outputs", "invalid_grammar")
        # the first mask, here off the engine loop: it builds the lexer's first states (copies share them),
        # and a request's first sampling step takes this row instead of computing it again
        first = np.frombuffer(m.compute_bitmask(), dtype=np.int32)
        with self._lock:
            self.num_compiled += 1
        return m, first


class StructuredOutputs:
    """The engine-side step work: the batch's bitmask before the runner samples (after it issues the
    forward), each matcher advanced after its token is appended."""

    def __init__(self, vocab_size: int, eos_token_ids=()):
        import numpy as np
        self.words = (vocab_size + 31) // 32
        # a row whose matcher allows nothing (an error state) may still end: EOS only
        self._eos_row = np.zeros(self.words, dtype=np.uint32)
        for t in eos_token_ids:
            self._eos_row[t // 32] |= np.uint32(1 << (t % 32))
        self._eos_row = self._eos_row.view(np.int32)

    def bitmask(self, batch, requests):
        """-> None, or (row indices among the batch's sampled rows, int32 bitmask (R, words)). Called
        once the forward is issued; a request sampled for the first time takes its grammar here
        (compiled: the scheduler held its step back until then). One whose grammar failed gets req.error,
        and EOS."""
        import numpy as np
        rows, matchers = [], []
        k = 0
        for seq, smp in zip(batch.seqs, batch.sample):
            if not smp:
                continue
            req = requests.get(seq.request_id)
            if req is not None and req.grammar is not None:
                first = None
                if req.matcher is None and req.error is None:
                    try:
                        template, first = req.grammar.result()
                        req.matcher = template.deep_copy()
                    except RequestError as e:
                        req.error = e
                rows.append(k)
                matchers.append(first if first is not None else req.matcher)
            k += 1
        if not rows:
            return None
        mask = np.zeros((len(rows), self.words), dtype=np.int32)
        # on this thread, row by row, straight into the rows (llguidance.numpy's fill_next_token_bitmask,
        # less its per-call checks): the executor's worker threads spin after their work and steal the
        # cores the sampler's and the next step's torch ops want right then
        ptr, row_bytes = mask.ctypes.data, mask.strides[0]
        for i, m in enumerate(matchers):
            if isinstance(m, np.ndarray):  # a first step: the mask the compile computed
                mask[i] = m[:self.words]  # llguidance may round its words up
            elif m is not None:
                m.unsafe_compute_mask_ptr(ptr + i * row_bytes, row_bytes)
        empty = ~mask.any(1)
        if empty.any():
            mask[empty] = self._eos_row if self._eos_row.any() else -1
        return rows, mask

    @staticmethod
    def advance(req, token: int) -> None:
        """The matcher consumes the request's newest token (once stopped, it has nothing to take)."""
        m = req.matcher
        if m is not None and not m.is_stopped() and not m.consume_token(token):
            # a parser limit hit mid-way (the mask never offers a token it refuses): from here it allows EOS only
            log.warning("request %s: structured output matcher failed: %s", req.request_id, m.get_error())
