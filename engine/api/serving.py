"""What the completion and chat endpoints share: an API request becomes choices (one engine
request per prompt and sample), each prepared by the engine's intake before any response starts; their
outputs are merged in arrival order, so streams interleave choices like OpenAI's do."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ..core.intake import PreparedRequest
from .errors import APIError, engine_error
from .metrics import Metrics

NO_PROBABILITY = -9999.0   # what OpenAI sends for a logprob of -inf: JSON has no infinities


@dataclass
class ServerState:
    """What every endpoint reads (app.state.server)."""
    engine: object               # an EngineClient (async_llm.py)
    metrics: Metrics
    template: object             # chat_template.ChatTemplate, or None: chat requests are refused
    created: int = field(default_factory=lambda: int(time.time()))
    served_model_names: list[str] = field(default_factory=list)   # --served-model-name; [] = the engine's
    tool_call_parser: str | None = None   # set with --enable-auto-tool-choice: tool_choice "auto" is served
    lora_modules: dict = field(default_factory=dict)   # --lora-modules: model name -> LoRARequest

    def __post_init__(self):
        self.served_model_names = list(dict.fromkeys(self.served_model_names)) or [self.engine.model_name]
        clash = set(self.served_model_names) & set(self.lora_modules)
        if clash:
            raise ValueError(f"LoRA module names {sorted(clash)} are the base model's served names")

    @property
    def model_name(self) -> str:
        """The name responses carry (vLLM's: the first served name)."""
        return self.served_model_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, model: str | None, running: bool = True) -> None:
        """404 for a model this server does not serve; 503 when it needs the engine running and it is not."""
        if model is not None and model not in self.served_model_names and model not in self.lora_modules:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if running and not self.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")

    def token_str(self, i: int) -> str:
        return self.tokenizer.decode([i], skip_special_tokens=False)


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def begin(request: Request, req) -> tuple[float, ServerState, str]:
    """A generating endpoint's start: its clock (for TTFT), the server, checked for req.model, and the model
    name its response carries (a LoRA module's own, else the first served name)."""
    t0 = time.perf_counter()
    st = state_of(request)
    st.check_model(req.model)
    return t0, st, req.model if req.model in st.lora_modules else st.model_name


@dataclass
class Choice:
    """One engine request: a (prompt, sample index) pair of an API request."""
    index: int
    prompt_index: int
    request: PreparedRequest
    request_id: str
    num_tokens: int = 0                      # generated so far (usage)
    finish_reason: str | None = None
    final: object = None                     # the finished RequestOutput (whole text, ids, logprobs)

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids


# ---------------------------------------------------------------- request -> choices

async def off_loop(fn, *args):
    """Tokenizing or rendering a long prompt takes long: on a worker thread it cannot stall
    /health or other streams."""
    return await asyncio.to_thread(fn, *args)


async def make_choices(st: ServerState, req, prompts: list, prefix: str, logprobs: int | None,
                       default_max_tokens: int | None = None, sampling: dict | None = None,
                       **prepare) -> tuple[str, list[Choice]]:
    """The engine requests of an API request. Admitted first (the engine's one bound: a full server
    answers 429 before any tokenizing), then each prompt prepared once by the engine's intake
    (defaulted, tokenized, checked; off the event loop): every error it can detect answers before a
    response (or a stream's 200) starts. A prompt may be a callable that makes it (a chat template's
    rendering): it runs on the same worker thread, one hand-off for both. sampling: SamplingParams fields
    the endpoint sets over the request's."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    ids = [f"{rid}-{i}" for i in range(len(prompts) * req.n)]
    st.engine.admit(ids)
    fields = {**req.sampling_fields(), "logprobs": logprobs, **(sampling or {})}
    lora = st.lora_modules.get(req.model)
    if lora is not None:  # the request's model is a LoRA module: its adapter over the base
        prepare["lora_request"] = lora
    try:
        prepared = await off_loop(lambda: [st.engine.prepare(p() if callable(p) else p, fields,
                                                             default_max_tokens=default_max_tokens, **prepare)
                                           for p in prompts])
        for r in prepared:  # a grammar that does not compile is a 400, before any stream starts
            if r.grammar is not None:
                if not r.grammar.done():
                    await asyncio.wrap_future(r.grammar)
                r.grammar.result()
    except BaseException:
        for i in ids:
            _abort(st.engine, i)
        raise
    choices = []
    for pi, r in enumerate(prepared):
        seed = r.params.seed
        for j in range(req.n):
            i = pi * req.n + j
            # seeded samples of one prompt each get their own stream (seed + index, as vLLM),
            # so n > 1 choices differ and stay reproducible
            rj = r if seed is None or j == 0 else \
                dataclasses.replace(r, params=dataclasses.replace(r.params, seed=seed + j))
            choices.append(Choice(i, pi, rj, ids[i]))
    return rid, choices


def prompt_text(st: ServerState, c: Choice) -> str:
    """The prompt as text (echo): the caller's text, or its token ids decoded."""
    r = c.request
    return r.prompt if r.prompt is not None else st.tokenizer.decode(r.prompt_token_ids)


# ---------------------------------------------------------------- running choices

def _abort(engine, request_id: str) -> None:
    try:
        engine.abort(request_id)  # sync: it must work inside a cancelled task, where awaits fail
    except Exception:
        pass


async def merge(st: ServerState, choices: list[Choice], t0: float) -> AsyncIterator[tuple]:
    """Run every choice as an engine request; yield (choice, delta) as deltas arrive.

    Leaving early (client gone, error, cancellation) cancels the pumps, which closes the
    engine iterators, and aborts the requests, so their KV blocks are freed."""
    engine, metrics = st.engine, st.metrics
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        last, finished = t0, False
        try:
            async for out in engine.generate(c.request, request_id=c.request_id):
                now = time.perf_counter()
                k = len(out.new_token_ids)
                if k:
                    if not c.num_tokens:
                        metrics.ttft.observe(now - t0)
                    else:
                        for _ in range(k):
                            metrics.itl.observe((now - last) / k)
                    metrics.generation_tokens.inc(k)
                    last = now
                queue.put_nowait((c, out, None))
                c.num_tokens += k
                finished = out.finished
            if not finished:  # the engine dropped it (stopped meanwhile): not a complete answer
                raise RuntimeError(f"request {c.request_id} ended unfinished")
            metrics.e2e.observe(time.perf_counter() - t0)
            queue.put_nowait((c, None, None))
        except Exception as e:
            queue.put_nowait((c, None, e))

    metrics.prompt_tokens.inc(sum(len(c.prompt_ids) for c in choices))
    tasks = [asyncio.create_task(pump(c)) for c in choices]
    left = len(tasks)
    try:
        while left:
            c, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                left -= 1
                continue
            yield c, out
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        for c in choices:
            if c.finish_reason is None:
                _abort(engine, c.request_id)


def record(c: Choice, out) -> None:
    """Note a choice's end: its finish reason and its whole output."""
    if out.finished:
        c.finish_reason, c.final = out.finish_reason or "stop", out


def norm_logprobs(token_ids, logprobs) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """RequestOutput logprobs ({token_id: logprob} dicts holding the sampled token and the top-N)
    -> [(token_id, logprob, top[(id, logprob)] best first)]."""
    res = []
    for tid, entry in zip(token_ids, logprobs or []):
        top = sorted(entry.items(), key=lambda kv: -_finite(kv[1]))
        lp = entry.get(tid, top[0][1] if top else 0.0)
        res.append((int(tid), _finite(lp), [(int(i), _finite(v)) for i, v in top]))
    return res


def prompt_logprobs_json(st: ServerState, out) -> list | None:
    """vLLM's prompt_logprobs response field: per prompt token {token_id: {logprob, decoded_token}}
    (the prompt's token and the top-N), the first null."""
    if out.prompt_logprobs is None:
        return None
    return [None if d is None else {str(i): {"logprob": _finite(v), "decoded_token": st.token_str(i)}
                                    for i, v in d.items()} for d in out.prompt_logprobs]


def _finite(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else NO_PROBABILITY


def usage(choices: list[Choice], generated: bool = True) -> dict:
    """generated=False: the prompts only were asked for (completions' echo with max_tokens 0)."""
    # a prompt counts once however many samples (n) were drawn from it; its cached tokens are its first sample's
    first = {}
    for c in choices:
        first.setdefault(c.prompt_index, c)
    p = sum(len(c.prompt_ids) for c in first.values())
    cached = sum(getattr(c.final, "num_cached_tokens", 0) for c in first.values())
    g = sum(c.num_tokens for c in choices) if generated else 0
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read, so only disconnect can come)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def collect(st: ServerState, request: Request, choices: list[Choice], t0: float):
    """Run to the end (each choice's final output in c.final); a client that disconnects meanwhile
    cancels the work."""
    async def run():
        async for c, out in merge(st, choices, t0):
            record(c, out)

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            raise APIError(499, "client disconnected")
        if work.exception() is not None:
            raise engine_error(work.exception(), st.engine)
    finally:
        for t in (work, gone):
            t.cancel()


def _sse(obj) -> str:
    # allow_nan=False: a stray non-finite number is an error here, never invalid JSON on the wire
    return f"data: {json.dumps(obj, separators=(',', ':'), allow_nan=False)}\n\n"


async def sse_stream(st: ServerState, chunks: AsyncIterator[dict], choices, rid, obj, include_usage,
                     generated: bool = True, model: str | None = None):
    """SSE framing, usage chunk, [DONE]; an engine failure mid-stream becomes an error chunk."""
    try:
        async for chunk in chunks:
            if include_usage:
                chunk["usage"] = None
            yield _sse(chunk)
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": model or st.model_name,
                        "choices": [], "usage": usage(choices, generated)})
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _sse(engine_error(e, st.engine).body)
