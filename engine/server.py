"""OpenAI-compatible HTTP server: FastAPI + uvicorn over AsyncLLM.

    gpt-engine serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]

POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health (503 once the engine cannot serve), GET /metrics (Prometheus text).
Every choice of a request (n, batched prompts) is one engine request; their outputs are
merged in arrival order, so streams interleave choices like OpenAI's do.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt_engine.metrics import Metrics
from gpt_engine.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, error_body
from gpt_engine.sampling import SamplingParams

log = logging.getLogger("gpt_engine.server")

MAX_SEQS_PER_REQUEST = 256   # len(prompts) * n: a bound so one request cannot flood the queue
OPEN_PATHS = ("/health", "/metrics")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def _engine_error(e: BaseException, engine) -> APIError:
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if not engine.is_running or isinstance(e, RuntimeError):
        return APIError(503, f"the engine cannot serve: {e}", "server_error", code="engine_unavailable")
    return APIError(500, f"{type(e).__name__}: {e}", "server_error")


# ---------------------------------------------------------------- chat template

class ChatTemplate:
    """A jinja2 chat template as in HF tokenizer_config.json, else a plain default:
    "<|role|>\\ncontent\\n" per message and "<|assistant|>\\n" to prompt the reply."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._template = None
        if source:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                log.warning("jinja2 is not installed: using the default chat template instead of the model's")
                return
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            text = "".join(f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages)
            return text + ("<|assistant|>\n" if add_generation_prompt else "")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # a template's raise_exception or a bad message shape: the client's fault
            raise APIError(400, f"chat template: {e}", param="messages") from e


def _raise_template_error(msg):
    raise ValueError(msg)


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The chat template of an HF model directory (tokenizer_config.json or chat_template.jinja)."""
    d = Path(model_dir)
    cfg_path, jinja_path = d / "tokenizer_config.json", d / "chat_template.jinja"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    source = cfg.get("chat_template")
    if isinstance(source, list):  # HF's named templates: [{"name", "template"}]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if source is None and jinja_path.is_file():
        source = jinja_path.read_text()

    def tok(name):
        v = cfg.get(name) or ""
        return v.get("content", "") if isinstance(v, dict) else v
    return ChatTemplate(source, tok("bos_token"), tok("eos_token"))


# ---------------------------------------------------------------- engine plumbing

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


def _abort(engine, request_id: str) -> None:
    try:
        engine.abort(request_id)  # sync: it must work inside a cancelled task, where awaits fail
    except Exception:
        pass


async def _merge(engine, choices: list[Choice], metrics: Metrics, t0: float) -> AsyncIterator[tuple]:
    """Run every choice as an engine request; yield (choice, delta) as deltas arrive.

    Leaving early (client gone, error, cancellation) cancels the pumps, which closes the
    engine iterators, and aborts the requests, so their KV blocks are freed."""
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


def _record(c: Choice, out, want_logprobs: bool) -> None:
    """Fold a delta into the choice; keep the logprobs of its new tokens if asked for."""
    c.text += out.new_text or ""
    c.token_ids = list(out.token_ids)
    if out.finished:
        c.finish_reason = out.finish_reason or "stop"
    if want_logprobs:
        c.logprobs.extend(_norm_logprobs(out))


def _norm_logprobs(out) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """RequestOutput.new_logprobs -> [(token_id, logprob, top[(id, logprob)] best first)].

    Each entry is a {token_id: logprob} dict holding the sampled token and the top-N."""
    entries = out.new_logprobs or []
    res = []
    for tid, entry in zip(out.new_token_ids, entries):
        if isinstance(entry, dict):
            top = sorted(entry.items(), key=lambda kv: -kv[1])
            lp = entry.get(tid, top[0][1] if top else 0.0)
        else:  # (logprob, top) or a bare logprob
            lp, top = (entry[0], sorted(dict(entry[1]).items(), key=lambda kv: -kv[1])) \
                if isinstance(entry, (tuple, list)) else (float(entry), [])
        res.append((int(tid), float(lp), [(int(i), float(v)) for i, v in top]))
    return res


# ---------------------------------------------------------------- the app

def _err(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


GENERATE_ERRORS = {400: _err("invalid request: wrong types, out-of-range values, prompt + max_tokens over "
                             "the context, malformed JSON"),
                   401: _err("missing or wrong API key (only with --api-key)"),
                   404: _err("unknown model"), 503: _err("the engine cannot serve")}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with its default 422 removed: validation errors answer 400 here, in
    OpenAI's error body, so a schema-driven client (or fuzzer) expects what the server sends."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema["paths"].values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def build_app(engine, api_key: str | None = None, chat_template: ChatTemplate | None = None) -> FastAPI:
    """The server app over an AsyncLLM. Its lifespan starts the engine (if not yet running)
    and stops it at shutdown, so in-flight requests are finished or aborted."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("the server needs a tokenizer: put a tokenizer.json in the model directory")
    metrics = Metrics()
    template = chat_template or ChatTemplate()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if not engine.is_running:
            await engine.start()
        try:
            yield
        finally:
            try:
                await engine.stop()
            except Exception:
                log.exception("engine.stop() failed")

    app = FastAPI(title="gpt-engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        if any(er.get("type") == "json_invalid" for er in errs):
            return JSONResponse(error_body(f"request body is not valid JSON: {errs[0].get('ctx', {}).get('error', '')}"),
                                status_code=400)

        def where(er):
            return ".".join(str(x) for x in er.get("loc", ()) if x != "body") or None
        msg = "; ".join(f"{where(er) or 'body'}: {er.get('msg')}" for er in errs)
        return JSONResponse(error_body(msg or "invalid request", param=where(errs[0]) if errs else None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        # e.headers carries the Allow of a 405, which RFC 9110 requires
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code, headers=e.headers)

    def check(model: str | None) -> None:
        if model is not None and model != engine.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if not engine.is_running:
            raise APIError(503, "the engine is not running", "server_error", code="engine_unavailable")

    def make_params(req, prompt_len: int, default_max: int | None, logprobs: int | None) -> SamplingParams:
        limit = engine.max_model_len
        room = limit - prompt_len
        max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max or room, room)
        if max_tokens < 1 or prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, "
                                f"{max(max_tokens, 1)} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=req.top_k if req.top_k > 0 else -1, min_p=req.min_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, stop=req.stop, stop_token_ids=req.stop_token_ids,
                seed=req.seed, ignore_eos=req.ignore_eos, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def make_choices(req, prompts: list[tuple[str, list[int]]], prefix: str, default_max, logprobs):
        if len(prompts) * req.n > MAX_SEQS_PER_REQUEST:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is over the limit of "
                                f"{MAX_SEQS_PER_REQUEST} sequences per request", param="n")
        rid = f"{prefix}-{uuid.uuid4().hex}"
        choices = []
        for pi, (text, ids) in enumerate(prompts):
            params = make_params(req, len(ids), default_max, logprobs)
            for j in range(req.n):
                i = pi * req.n + j
                choices.append(Choice(i, pi, text, ids, params, f"{rid}-{i}"))
        return rid, choices

    def token_ids_of(p, param: str = "prompt") -> tuple[str, list[int]]:
        if isinstance(p, str):
            try:  # JSON's "\ud800" decodes to a lone surrogate, on which the tokenizer raises TypeError
                p.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{param} is not valid Unicode: {e.reason}", param=param) from None
            ids = tok.encode(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            return p, ids
        vocab = max(tok.vocab_size, getattr(engine, "vocab_size", 0) or 0)
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", param="prompt")
        return tok.decode(p), list(p)

    def token_str(i: int) -> str:
        return tok.decode([i], skip_special_tokens=False)

    async def collect(request: Request, choices: list[Choice], want_logprobs: bool, t0: float):
        """Run to the end; a client that disconnects meanwhile cancels the work."""
        async def run():
            async for c, out in _merge(engine, choices, metrics, t0):
                _record(c, out, want_logprobs)

        work = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                raise APIError(499, "client disconnected")
            if work.exception() is not None:
                raise _engine_error(work.exception(), engine)
        finally:
            for t in (work, gone):
                t.cancel()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def stream(chunks: AsyncIterator[dict], choices, rid, obj, include_usage):
        """SSE framing, usage chunk, [DONE]; an engine failure becomes an error chunk."""
        try:
            async for chunk in chunks:
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            if include_usage:
                yield sse({"id": rid, "object": obj, "created": int(time.time()), "model": engine.model_name,
                           "choices": [], "usage": _usage(choices)})
            yield "data: [DONE]\n\n"
        except Exception as e:
            err = e if isinstance(e, APIError) else _engine_error(e, engine)
            yield sse(err.body)

    # ------------------------------------------------------------ endpoints

    @app.get("/health")
    async def health():
        if engine.is_running:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        try:
            stats = engine.stats()
        except Exception:
            stats = None
        return Response(metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card():
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "gpt-engine",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses={404: _err("no such model")})
    async def model(model_id: str):
        if model_id != engine.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", responses=GENERATE_ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        check(req.model)
        prompts = [token_ids_of(p) for p in req.prompt]
        rid, choices = make_choices(req, prompts, "cmpl", 16, req.logprobs)
        want_lp = req.logprobs is not None
        offsets = {c.index: 0 for c in choices}

        def logprobs_of(c: Choice, entries) -> dict | None:
            if not want_lp:
                return None
            toks = [token_str(t) for t, _, _ in entries]
            text_offset = []
            for s in toks:
                text_offset.append(offsets[c.index])
                offsets[c.index] += len(s)
            return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in entries],
                    "top_logprobs": [{token_str(i): v for i, v in top[:req.logprobs]} for _, _, top in entries],
                    "text_offset": text_offset}

        if req.stream:
            async def chunks():
                echoed = set()
                async for c, out in _merge(engine, choices, metrics, t0):
                    n_before = len(c.logprobs)
                    _record(c, out, want_lp)
                    text = out.new_text or ""
                    if req.echo and c.index not in echoed:
                        echoed.add(c.index)
                        text = c.prompt_text + text
                    if not text and not out.finished and not out.new_token_ids:
                        continue
                    yield {"id": rid, "object": "text_completion", "created": int(time.time()),
                           "model": engine.model_name,
                           "choices": [{"index": c.index, "text": text,
                                        "logprobs": logprobs_of(c, c.logprobs[n_before:]),
                                        "finish_reason": c.finish_reason}]}
            return StreamingResponse(stream(chunks(), choices, rid, "text_completion", req.include_usage),
                                     media_type="text/event-stream")

        await collect(request, choices, want_lp, t0)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": engine.model_name,
                "choices": [{"index": c.index, "text": (c.prompt_text if req.echo else "") + c.text,
                             "logprobs": logprobs_of(c, c.logprobs), "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": _usage(choices)}

    @app.post("/v1/chat/completions", responses=GENERATE_ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        check(req.model)
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
        text = template.render(messages, req.add_generation_prompt)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        rid, choices = make_choices(req, [token_ids_of(text, "messages")], "chatcmpl", None, top_n)

        def logprobs_of(entries) -> dict | None:
            if top_n is None:
                return None

            def item(i, lp):
                s = token_str(i)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top[:top_n]]}
                                for t, lp, top in entries]}

        if req.stream:
            async def chunks():
                base = {"id": rid, "object": "chat.completion.chunk", "model": engine.model_name}
                for c in choices:  # the role first, as OpenAI does
                    yield {**base, "created": int(time.time()), "choices": [
                        {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]}
                async for c, out in _merge(engine, choices, metrics, t0):
                    n_before = len(c.logprobs)
                    _record(c, out, top_n is not None)
                    if not out.new_text and not out.finished and not out.new_token_ids:
                        continue
                    delta = {"content": out.new_text} if out.new_text else {}
                    yield {**base, "created": int(time.time()), "choices": [
                        {"index": c.index, "delta": delta, "logprobs": logprobs_of(c.logprobs[n_before:]),
                         "finish_reason": c.finish_reason}]}
            return StreamingResponse(stream(chunks(), choices, rid, "chat.completion.chunk", req.include_usage),
                                     media_type="text/event-stream")

        await collect(request, choices, top_n is not None, t0)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": engine.model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": logprobs_of(c.logprobs), "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": _usage(choices)}

    app.state.engine, app.state.metrics = engine, metrics
    return app


def _usage(choices: list[Choice]) -> dict:
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


class _Gate:
    """ASGI middleware: bearer-key check on /v1/* and per-endpoint request counts. Plain ASGI
    rather than BaseHTTPMiddleware, which would get between StreamingResponse and disconnects."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = 500

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            if self.api_key and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
                resp = JSONResponse(error_body("Incorrect or missing API key: send Authorization: Bearer <key>",
                                               code="invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, key = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())
        return False


# ---------------------------------------------------------------- CLI

def add_args(p) -> None:
    p.add_argument("model", help="HF-format model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GPT_ENGINE_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1/* (default: $GPT_ENGINE_API_KEY)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"])
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one running batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    e.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    e.add_argument("--block-size", type=int, default=None, help="tokens per KV-cache block")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized to memory)")
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    e.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    e.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="info")


ENGINE_ARGS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_kv_blocks",
               "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "seed")


def run(args) -> int:
    import torch
    import uvicorn

    from gpt_engine.llm import LLM, AsyncLLM

    logging.basicConfig(level=args.log_level.upper())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    engine_args = {k: getattr(args, k) for k in ENGINE_ARGS if getattr(args, k, None) is not None}
    dtype = getattr(torch, args.dtype) if args.dtype else None
    llm = LLM(args.model, device=args.device, dtype=dtype, **engine_args)
    app = build_app(AsyncLLM(llm), api_key=args.api_key, chat_template=load_chat_template(args.model))
    # this process is the server's: its start-up heap (model, tokenizer, libraries: ~300k objects)
    # leaves the cyclic collector's scans, as vLLM does after start-up (3.5% of a CPU bench run)
    gc.collect()
    gc.freeze()
    # uvicorn turns SIGTERM into a graceful shutdown: stop accepting, let streams end, then lifespan stops the engine
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0
