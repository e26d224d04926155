"""What the completion and chat endpoints share: an API request becomes choices (one engine
request per prompt and sample), each checked by the engine before any response starts; their
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

from ..core.request import check_context, check_token_ids
from ..core.sampling_params import SamplingParams
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

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")

    def token_str(self, i: int) -> str:
        return self.tokenizer.decode([i], skip_special_tokens=False)


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def begin(request: Request, req) -> tuple[float, ServerState]:
    """A generating endpoint's start: its clock (for TTFT) and the server, checked for req.model."""
    t0 = time.perf_counter()
    st = state_of(request)
    st.check_model(req.model)
    return t0, st


@dataclass
class Choice:
    """One engine request: a (prompt, sample index) pair of an API request."""
    index: int
    prompt_index: int
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)   # [(token_id, logprob, [(id, logprob), ...])]


# ---------------------------------------------------------------- request -> choices

def prompt_of(st: ServerState, p, param: str = "prompt", add_special_tokens: bool = True) -> tuple[str, list[int]]:
    """A prompt (text or token ids) -> (text, ids). Text gets the tokenizer's BOS where it adds one,
    except rendered chat, which carries its own (add_special_tokens=False)."""
    tok = st.tokenizer
    if isinstance(p, str):
        try:  # JSON's "\ud800" decodes to a lone surrogate, on which the tokenizer raises TypeError
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param} is not valid Unicode: {e.reason}", param=param) from None
        ids = tok.encode(p, add_special_tokens=add_special_tokens)
        check_token_ids(ids, st.engine.vocab_size, param)
        return p, ids
    ids = check_token_ids(p, max(tok.vocab_size, st.engine.vocab_size), param)
    return tok.decode(ids), ids


async def off_loop(fn, *args):
    """Tokenizing or rendering a long prompt takes long: on a worker thread it cannot stall
    /health or other streams."""
    return await asyncio.to_thread(fn, *args)


def sampling_params(st: ServerState, req, prompt_len: int, default_max: int | None,
                    logprobs: int | None) -> SamplingParams:
    # the model directory's generation_config.json fills what the request leaves unset, as vLLM does
    model_defaults = getattr(st.engine, "default_sampling", None) or {}
    default_max = model_defaults.get("max_tokens", default_max)
    # without max_tokens: what is left of the context (the engine's context fits its KV pool)
    room = st.engine.max_model_len - prompt_len
    max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max or room, room)
    check_context(prompt_len, max_tokens, st.engine.max_model_len)
    fields = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k if req.top_k > 0 else -1,
                  min_p=req.min_p, repetition_penalty=req.repetition_penalty)
    fields.update({k: v for k, v in model_defaults.items() if k in fields and k not in req.model_fields_set})
    try:
        return SamplingParams(
            max_tokens=max_tokens, **fields, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, stop=req.stop, stop_token_ids=req.stop_token_ids,
            seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as e:  # what the protocol lets through but the sampler refuses
        raise APIError(400, str(e)) from None


def make_choices(st: ServerState, req, prompts: list[tuple[str, list[int]]], prefix: str, default_max,
                 logprobs) -> tuple[str, list[Choice]]:
    """The engine requests of an API request, each already checked by the engine and admitted:
    every error it can detect, and a full server (429), answers before a response (or a stream's
    200) starts."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    choices = []
    for pi, (text, ids) in enumerate(prompts):
        params = sampling_params(st, req, len(ids), default_max, logprobs)
        st.engine.validate(ids, params)
        for j in range(req.n):
            i = pi * req.n + j
            # seeded samples of one prompt each get their own stream (seed + index, as vLLM),
            # so n > 1 choices differ and stay reproducible
            p = params if params.seed is None or j == 0 else dataclasses.replace(params, seed=params.seed + j)
            choices.append(Choice(i, pi, text, ids, p, f"{rid}-{i}"))
    st.engine.admit(len(choices))
    return rid, choices


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
            async for out in engine.generate(c.prompt_ids, c.params, c.request_id):
                now = time.perf_counter()
                k = len(out.new_token_ids)
                if k:
                    if not c.token_ids:
                        metrics.ttft.observe(now - t0)
                    else:
                        for _ in range(k):
                            metrics.itl.observe((now - last) / k)
                    metrics.generation_tokens.inc(k)
                    last = now
                queue.put_nowait((c, out, None))
                c.token_ids, finished = list(out.token_ids), out.finished
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


def record(c: Choice, out, want_logprobs: bool) -> None:
    """Fold a delta into the choice; keep the logprobs of its new tokens if asked for."""
    c.text += out.new_text or ""
    c.token_ids = list(out.token_ids)
    if out.finished:
        c.finish_reason = out.finish_reason or "stop"
    if want_logprobs:
        c.logprobs.extend(_norm_logprobs(out))


def _norm_logprobs(out) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """RequestOutput.new_logprobs ({token_id: logprob} dicts holding the sampled token and the
    top-N) -> [(token_id, logprob, top[(id, logprob)] best first)]."""
    res = []
    for tid, entry in zip(out.new_token_ids, out.new_logprobs or []):
        top = sorted(entry.items(), key=lambda kv: -_finite(kv[1]))
        lp = entry.get(tid, top[0][1] if top else 0.0)
        res.append((int(tid), _finite(lp), [(int(i), _finite(v)) for i, v in top]))
    return res


def _finite(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else NO_PROBABILITY


def usage(choices: list[Choice]) -> dict:
    # a prompt counts once however many samples (n) were drawn from it
    p = sum({c.prompt_index: len(c.prompt_ids) for c in choices}.values())
    g = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is already read, so only disconnect can come)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def collect(st: ServerState, request: Request, choices: list[Choice], want_logprobs: bool, t0: float):
    """Run to the end; a client that disconnects meanwhile cancels the work."""
    async def run():
        async for c, out in merge(st, choices, t0):
            record(c, out, want_logprobs)

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


async def sse_stream(st: ServerState, chunks: AsyncIterator[dict], choices, rid, obj, include_usage):
    """SSE framing, usage chunk, [DONE]; an engine failure mid-stream becomes an error chunk."""
    try:
        async for chunk in chunks:
            if include_usage:
                chunk["usage"] = None
            yield _sse(chunk)
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": st.engine.model_name,
                        "choices": [], "usage": usage(choices)})
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _sse(engine_error(e, st.engine).body)
