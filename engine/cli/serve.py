"""gpt-engine serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine flags]

Starts the OpenAI-compatible server (engine/api/) over an AsyncLLM: POST /v1/completions,
POST /v1/chat/completions (stream or not), POST /tokenize, POST /detokenize, GET /v1/models,
GET /health (503 once the engine cannot serve), GET /metrics (Prometheus text). With --enable-lora,
--lora-modules NAME=DIR serves PEFT LoRA adapters as models named NAME (listed by /v1/models).
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal

from ..api.app import build_app
from ..api.middleware import DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS
from ..api.tool_parsers import tool_parsers
from ..chat_template import ChatTemplate, read_template_arg
from ..core.lora import LoRARequest
from ..engine_config import EngineConfig
from .flags import add_dataclass_args, from_args

__all__ = ["build_app", "ChatTemplate", "add_args", "run"]
log = logging.getLogger("gpt_engine.cli.serve")


def add_args(p) -> None:
    p.add_argument("model", help="HF-format model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GPT_ENGINE_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1/* (default: $GPT_ENGINE_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the names requests may give as model, listed by /v1/models; responses carry the "
                        "first (default: the model directory's name)")
    p.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                   help="jinja chat template (default: the model's own)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto": the model decides, the output is read by --tool-call-parser')
    p.add_argument("--tool-call-parser", default=None, choices=tool_parsers(),
                   help="how the model writes tool calls: hermes (Qwen2.5, Hermes), llama3_json (Llama 3.1)")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST,HOST",
                   help="Host header names served, against DNS rebinding; * for any (default: the loopback "
                        "names when bound to loopback, else any)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body; larger gets 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long running streams may finish before they are ended (default: 30)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                   help='LoRA adapters (PEFT directories) served as models named NAME (with --enable-lora): a '
                        'request\'s model picks one; also vLLM\'s JSON form \'{"name": NAME, "path": DIR}\'')
    p.add_argument("--log-level", default="info")
    p.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                   help="engine replicas, each a process of its own, behind this server: requests routed by "
                        "prompt prefix (to the replica that has it cached) and by load (default: 1)")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig)


def run(args) -> int:
    import uvicorn

    from ..async_llm import AsyncLLM
    from ..llm import LLM

    logging.basicConfig(level=args.log_level.upper())
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    if args.data_parallel_size > 1:
        return run_data_parallel(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    modules = lora_modules(args.lora_modules)
    if modules and not args.enable_lora:
        raise SystemExit("--lora-modules needs --enable-lora")
    llm = LLM(args.model, config=from_args(EngineConfig, args))
    for m in modules:  # a bad adapter fails the start, not its first request
        try:
            llm.check_lora(m)
        except ValueError as e:
            raise SystemExit(f"--lora-modules {m.lora_name}: {e}") from None
    # without a template the server still serves completions; chat requests get a 400 saying so
    template = llm.template(read_template_arg(args.chat_template), hint="pass --chat-template FILE") \
        if args.chat_template else llm.chat_template
    engine = AsyncLLM(llm)
    app = build_app(engine, api_key=args.api_key, chat_template=template,
                    allowed_hosts=allowed_hosts(args.allowed_hosts, args.host), max_body_bytes=args.max_body_bytes,
                    served_model_names=args.served_model_name,
                    enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                    lora_modules=modules)
    # this process is the server's: its start-up heap (model, tokenizer, libraries) leaves the
    # cyclic collector's scans, as vLLM does after start-up
    gc.collect()
    gc.freeze()
    # uvicorn turns SIGTERM into a graceful shutdown: stop accepting and let streams end; after
    # --shutdown-timeout serve() stops the engine, which ends the streams still running, and
    # lifespan then stops it for good. uvicorn's own deadline, a little later, is only the backstop
    # for a response that does not end with its engine request (it cancels the task mid-write).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + BACKSTOP_S)
    return asyncio.run(serve(_Server(config), engine, grace_s=args.shutdown_timeout))


def lora_modules(values: list[str] | None) -> list[LoRARequest]:
    """--lora-modules' NAME=DIR or {"name", "path"} items -> LoRARequests, ids 1, 2, ... in order."""
    out: dict[str, LoRARequest] = {}
    for v in values or ():
        if v.lstrip().startswith("{"):
            try:
                d = json.loads(v)
                name, path = d["name"], d["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SystemExit(f"--lora-modules: {v!r} is not {{\"name\": NAME, \"path\": DIR}}") from None
        else:
            name, eq, path = v.partition("=")
            if not eq or not name or not path:
                raise SystemExit(f"--lora-modules: {v!r} is not NAME=DIR")
        if name in out:
            raise SystemExit(f"--lora-modules: the name {name!r} is given twice")
        try:
            out[name] = LoRARequest(name, len(out) + 1, path)
        except ValueError as e:
            raise SystemExit(f"--lora-modules: {e}") from None
    return list(out.values())


BACKSTOP_S = 2.0  # past --shutdown-timeout, until uvicorn cancels the responses still open


def _Server(config):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM once its graceful shutdown is done, so the process
        dies by the signal even after a clean stop; SIGTERM is how a supervisor asks for a stop, so
        a clean one exits 0 (an engine failure still exits 1). SIGINT keeps uvicorn's behaviour."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server(config)


def allowed_hosts(arg: str | None, host: str) -> list[str] | None:
    """--allowed-hosts as a list; by default the loopback names when bound to loopback (a page on
    another site must not reach the server through a rebound DNS name), else None: any Host."""
    if arg is not None:
        return [h.strip() for h in arg.split(",") if h.strip()]
    return list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else None


async def serve(server, engine, sockets=None, poll_s: float = 0.5, grace_s: float | None = None) -> int:
    """Run the uvicorn server until it stops; if the engine fails (a step raised or hung), shut
    the server down and return 1 so a supervisor restarts the process. 0 after a clean stop.
    With grace_s, a shutdown (SIGTERM) gives running requests grace_s seconds to finish, then
    stops the engine: the streams still running end (an error chunk, then the response's end)
    and the server's wait for open connections ends with them."""
    async def watch():
        while not server.should_exit:
            if getattr(engine, "failed", None) is not None:
                log.error("the engine failed (%s): shutting down", engine.failed)
                server.should_exit = True
                return
            await asyncio.sleep(poll_s)
        if grace_s is None:
            return
        await asyncio.sleep(grace_s)
        if getattr(engine, "num_inflight", 0):
            log.warning("shutdown: ending %d request(s) still running after %g s", engine.num_inflight, grace_s)
        await engine.stop()

    watcher = asyncio.create_task(watch())
    try:
        await server.serve(sockets=sockets)
    finally:
        watcher.cancel()
    return 1 if getattr(engine, "failed", None) is not None else 0


# ---------------------------------------------------------------- data parallel

REPLICA_START_S = 600.0   # how long the replicas may take to load
FRONT_ONLY = {"host", "port", "api_key", "allowed_hosts", "data_parallel_size"}


def replica_argv(args) -> list[str]:
    """The command line of one replica: the model and every flag given, but those of the front server."""
    import argparse
    p = argparse.ArgumentParser()
    add_args(p)
    argv = [args.model]
    for a in p._actions:
        if not a.option_strings or a.dest in FRONT_ONLY or a.dest == "help":
            continue
        v = getattr(args, a.dest)
        if v == a.default:
            continue
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(a.option_strings[0])
        else:
            argv += [a.option_strings[0], *(map(str, v) if isinstance(v, list) else [str(v)])]
    return argv


def run_data_parallel(args) -> int:
    """--data-parallel-size N: N `gpt-engine serve` replicas on loopback ports behind a router (api/router.py)."""
    import socket

    import httpx
    import uvicorn

    from ..api.metrics import Metrics
    from ..api.middleware import Gate
    from ..api.router import Router, build_router_app, start_replicas, wait_ready

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
    n = args.data_parallel_size
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # the replicas share the cores
    socks = [socket.socket() for _ in range(n)]
    for sk in socks:
        sk.bind(("127.0.0.1", 0))
    ports = [sk.getsockname()[1] for sk in socks]
    for sk in socks:
        sk.close()
    replicas, key = start_replicas(n, replica_argv(args), ports, env)
    try:
        wait_ready(replicas, REPLICA_START_S)
        router = Router(replicas, key)

        class Front:  # what serve() watches: failed once no replica is left
            num_inflight = 0

            @property
            def failed(self):
                return None if router.live() else RuntimeError("no engine replica is left")

            async def stop(self):
                pass

        async def main() -> int:
            async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
                app = build_router_app(router, client)
                app.add_middleware(Gate, api_key=args.api_key, metrics=Metrics(),
                                   allowed_hosts=allowed_hosts(args.allowed_hosts, args.host),
                                   max_body_bytes=args.max_body_bytes)
                config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                        timeout_graceful_shutdown=args.shutdown_timeout + BACKSTOP_S)
                watcher = asyncio.create_task(router.watch())
                try:
                    return await serve(_Server(config), Front())
                finally:
                    watcher.cancel()
        return asyncio.run(main())
    finally:
        for r in replicas:  # each drains its streams (SIGTERM), as a server of its own
            r.proc.terminate()
        for r in replicas:
            try:
                r.proc.wait(args.shutdown_timeout + 2 * BACKSTOP_S)
            except Exception:
                r.proc.kill()

