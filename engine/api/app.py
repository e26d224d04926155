"""build_app: the server app over an EngineClient, and its small endpoints (health, metrics,
models); the generating endpoints live in completions.py and chat.py, /tokenize and /detokenize
in tokenize.py."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..chat_template import ChatTemplate
from . import chat, completions, errors, tokenize
from .errors import NOT_FOUND, APIError
from .metrics import Metrics
from .middleware import DEFAULT_MAX_BODY_BYTES, Gate
from .serving import ServerState, state_of
from .tool_parsers import tool_parser

log = logging.getLogger("gpt_engine.cli.serve")
router = APIRouter()

# the page is one inline file talking only to this server: nothing may load from elsewhere
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'", "Cache-Control": "no-cache"}


@cache
def _chat_page() -> str:
    return resources.files(__package__).joinpath("static").joinpath("chat.html").read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def chat_page():
    """The chat web page: public (the Gate asks for the key on /v1/* only); the page sends the key."""
    return HTMLResponse(_chat_page(), headers=PAGE_HEADERS)


@router.get("/health")
async def health(request: Request):
    if state_of(request).engine.is_running:
        return {"status": "ok"}
    return JSONResponse({"status": "unavailable"}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request):
    st = state_of(request)
    try:
        stats = st.engine.stats()
    except Exception:
        stats = None
    return Response(st.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(st: ServerState, name: str) -> dict:
    lora = st.lora_modules.get(name)
    card = {"id": name, "object": "model", "created": st.created, "owned_by": "gpt-engine",
            "root": st.engine.model_name if lora is None else lora.lora_path, "parent": None,
            "max_model_len": st.engine.max_model_len}
    return card if lora is None else dict(card, parent=st.model_name)  # vLLM's card of a LoRA module


@router.get("/v1/models")
async def models(request: Request):
    st = state_of(request)
    return {"object": "list", "data": [_model_card(st, name) for name in (*st.served_model_names, *st.lora_modules)]}


@router.get("/v1/models/{model_id:path}", responses=NOT_FOUND)
async def model(model_id: str, request: Request):
    st = state_of(request)
    st.check_model(model_id, running=False)
    return _model_card(st, model_id)


def build_app(engine, api_key: str | None = None, chat_template: ChatTemplate | None = None,
              allowed_hosts: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              served_model_names: list[str] | None = None, enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None, lora_modules: list | None = None) -> FastAPI:
    """The app over an EngineClient. Its lifespan starts the engine (if not yet running) and
    stops it at shutdown, so in-flight requests are finished or aborted. Without a chat template,
    chat requests get a 400. served_model_names: the names requests may give as `model` and
    /v1/models lists (default: the engine's model_name); responses carry the first.
    enable_auto_tool_choice with tool_call_parser (a registered name): tool_choice "auto" is served,
    the output read by that parser (vLLM's --enable-auto-tool-choice --tool-call-parser). lora_modules:
    LoRARequests (checked by the engine) served under their names as models: a request's `model` picks one."""
    if engine.tokenizer is None:
        raise ValueError("the server needs a tokenizer: put a tokenizer.json in the model directory")
    if enable_auto_tool_choice and not tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if tool_call_parser:
        tool_parser(tool_call_parser)   # an unknown name fails here, at start-up

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
    app.state.server = st = ServerState(engine, Metrics(), chat_template,
                                        served_model_names=list(served_model_names or ()),
                                        tool_call_parser=tool_call_parser if enable_auto_tool_choice else None,
                                        lora_modules={m.lora_name: m for m in lora_modules or ()})
    app.state.engine, app.state.metrics = engine, st.metrics
    app.add_middleware(Gate, api_key=api_key, metrics=st.metrics, allowed_hosts=allowed_hosts,
                       max_body_bytes=max_body_bytes)
    errors.install(app)
    for r in (router, completions.router, chat.router, tokenize.router):
        app.include_router(r)
    return app
