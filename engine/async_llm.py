"""AsyncLLM: the streaming engine the server drives, and EngineClient, what the server needs
of an engine.

A background thread runs LLM.step(); each RequestOutput travels to its request's asyncio
queue via call_soon_threadsafe, so the event loop never blocks on a model step. Requests
enter and leave the LLM only on that thread, between steps.

Bounded: at most max_inflight requests are held (past it, Overloaded: a 429). Fail-stop: an
exception in a step, or a step that outlasts the watchdog (step_timeout), ends every request
with an error and leaves the engine failed for good (the server then exits for a supervisor
to restart it).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import AsyncIterator, Protocol

from .llm import LLM
from .core.request import RequestOutput
from .core.sampling_params import SamplingParams
from .core.scheduler import Overloaded

log = logging.getLogger("gpt_engine.engine")
STOP_JOIN_S = 10.0   # how long stop() waits for the loop: a hung step must not hang shutdown


class EngineClient(Protocol):
    """The engine as the server sees it."""
    tokenizer: object            # encode(text) -> ids, decode(ids) -> text, vocab_size
    model_name: str
    max_model_len: int
    vocab_size: int
    default_sampling: dict       # SamplingParams fields the model directory sets (generation_config.json)

    @property
    def is_running(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def validate(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """RequestError (a ValueError) for a request the engine would refuse."""

    def generate(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    def admit(self, n: int) -> None:
        """Overloaded when n more requests would pass the engine's bound."""


class AsyncLLM:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.tokenizer, self.model_name = llm.tokenizer, llm.model_name
        self.default_sampling = llm.default_sampling  # generation_config.json's, for unset request fields
        self.max_model_len, self.vocab_size = llm.max_model_len, llm.vocab_size
        self._lock = threading.Lock()           # guards _pending
        self._pending: list = []                # ("add", prompt, params, request_id) | ("abort", request_id)
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        cfg = llm.config
        self.max_inflight = cfg.max_inflight_requests or (cfg.max_num_seqs + llm.max_waiting)
        self.step_timeout = cfg.step_timeout
        self._step_start: float | None = None   # monotonic start of the step in progress
        self._watchdog: threading.Thread | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self._error is None

    @property
    def failed(self) -> BaseException | None:
        """Why the engine cannot serve any more (a step raised or hung), or None."""
        return self._error

    @property
    def num_inflight(self) -> int:
        return len(self._queues)

    def stats(self) -> dict:
        return self.llm.stats()

    def admit(self, n: int) -> None:
        if len(self._queues) + n > self.max_inflight:
            raise Overloaded(f"the server holds {len(self._queues)} requests (max_inflight_requests "
                             f"{self.max_inflight}); retry later")

    def validate(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        return self.llm.validate(prompt, params)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.is_running:
            return
        self._stopping, self._error = False, None
        self._thread = threading.Thread(target=self._loop, name="gpt-engine-loop", daemon=True)
        self._thread.start()
        if self.step_timeout:
            self._watchdog = threading.Thread(target=self._watch, name="gpt-engine-watchdog", daemon=True)
            self._watchdog.start()

    async def stop(self) -> None:
        """Abort in-flight requests (their iterators end unfinished) and stop the loop; a loop
        stuck in a step is left behind (its thread is a daemon) after STOP_JOIN_S."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, STOP_JOIN_S)

    def _watch(self) -> None:
        """The watchdog: a step running past step_timeout fails the engine as an exception would."""
        period = min(1.0, self.step_timeout / 4)
        while self._thread is not None and self._thread.is_alive() and not self._stopping and self._error is None:
            start = self._step_start
            if start is not None and time.monotonic() - start > self.step_timeout:
                self._fail(TimeoutError(f"an engine step ran over {self.step_timeout:g} s (step_timeout)"))
                return
            time.sleep(period)

    def _fail(self, e: BaseException) -> None:
        """Fail-stop: every waiter gets the error, and every later request is refused."""
        with self._lock:
            if self._error is not None:
                return
            self._error = e
        log.error("engine failed: %s: %s", type(e).__name__, e, exc_info=e)
        err = RuntimeError(f"engine loop died: {type(e).__name__}: {e}")
        for rid in list(self._queues):
            self._post(rid, err)
        self._queues.clear()

    def _post(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed
            self._queues.pop(rid, None)

    def _end(self, rid: str, item=None) -> None:
        self._post(rid, item)
        self._queues.pop(rid, None)

    def _loop(self) -> None:
        llm = self.llm
        deferred: OrderedDict[str, tuple] = OrderedDict()   # request id -> add_request's arguments
        try:
            while True:
                with self._lock:
                    while not self._pending and not llm.has_unfinished() and not deferred and not self._stopping:
                        self._wake.wait()
                    pending, self._pending = self._pending, []
                    stopping = self._stopping
                for op, *args in pending:
                    if op == "add":
                        deferred[args[2]] = args
                    else:  # the stream (if anyone still reads it) ends unfinished
                        if deferred.pop(args[0], None) is None:
                            llm.abort(args[0])
                        self._end(args[0])
                if stopping:
                    for rid in [*llm.abort_all(), *deferred]:
                        self._end(rid)
                    return
                # admitted requests past the scheduler's waiting bound wait here, in order
                # (max_inflight bounds both)
                while deferred and llm.can_add():
                    rid, args = deferred.popitem(last=False)
                    try:
                        llm.add_request(*args, stream=True)
                    except Exception as e:
                        self._end(rid, e)
                if self._error is not None:  # the watchdog gave up on a step that has now returned
                    return
                if llm.has_unfinished():
                    self._step_start = time.monotonic()
                    outs = llm.step()
                    self._step_start = None
                    if self._error is not None:
                        return
                    for out in outs:
                        self._post(out.request_id, out)
                        if out.finished:
                            self._end(out.request_id)
        except BaseException as e:
            self._fail(e)

    # ---------------------------------------------------------------- requests
    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))
            self._wake.notify()

    async def generate(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise RuntimeError(f"engine loop died: {type(self._error).__name__}: {self._error}")
        if not self.is_running:
            raise RuntimeError("the engine is not running (call await engine.start())")
        params = params or SamplingParams()
        self.llm.validate(prompt, params)  # errors before anything is yielded
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.admit(1)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), q)
        with self._lock:
            if self._error is not None:  # failed meanwhile: nobody would post to this queue
                self._queues.pop(request_id, None)
                raise RuntimeError(f"engine loop died: {type(self._error).__name__}: {self._error}")
            self._pending.append(("add", prompt, params, request_id))
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # consumer left early (disconnect, cancel, error): free its blocks
                self._queues.pop(request_id, None)
                self.abort(request_id)
