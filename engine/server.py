"""gpt-engine serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine flags]

Starts the OpenAI-compatible server (engine/api/) over an AsyncLLM: POST /v1/completions,
POST /v1/chat/completions (stream or not), GET /v1/models, GET /health (503 once the engine
cannot serve), GET /metrics (Prometheus text).
"""
from __future__ import annotations

import gc
import logging
import os

from .api.app import build_app
from .chat_template import ChatTemplate, load_chat_template, read_template_arg
from .engine_config import EngineConfig
from .flags import add_dataclass_args, from_args

__all__ = ["build_app", "ChatTemplate", "load_chat_template", "add_args", "run"]
log = logging.getLogger("gpt_engine.server")


def add_args(p) -> None:
    p.add_argument("model", help="HF-format model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GPT_ENGINE_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1/* (default: $GPT_ENGINE_API_KEY)")
    p.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                   help="jinja chat template (default: the model's own)")
    p.add_argument("--log-level", default="info")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig)


def run(args) -> int:
    import uvicorn

    from .async_llm import AsyncLLM
    from .llm import LLM

    logging.basicConfig(level=args.log_level.upper())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    llm = LLM(args.model, config=from_args(EngineConfig, args))
    template = ChatTemplate.of_tokenizer(llm.tokenizer, args.chat_template and read_template_arg(args.chat_template))
    app = build_app(AsyncLLM(llm), api_key=args.api_key, chat_template=template)
    # this process is the server's: its start-up heap (model, tokenizer, libraries) leaves the
    # cyclic collector's scans, as vLLM does after start-up
    gc.collect()
    gc.freeze()
    # uvicorn turns SIGTERM into a graceful shutdown: stop accepting, let streams end, then lifespan stops the engine
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0
