"""AsyncLLM: the streaming engine the server drives, and EngineClient, what the server needs
of an engine.

A background thread runs LLM.step(); each RequestOutput travels to its request's asyncio
queue via call_soon_threadsafe, so the event loop never blocks on a model step. Requests
enter and leave the LLM only on that thread, between steps.

Bounded: at most max_inflight requests are held, the engine's one admission bound (past it,
Overloaded: a 429); requests arrive prepared (LLM.prepare), so nothing is checked here. Fail-stop: an
exception in a step, or a step that outlasts the watchdog (step_timeout), ends every request
with an error and leaves the engine failed for good (the server then exits for a supervisor
to restart it).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import AsyncIterator, Protocol

from .llm import LLM
from .core.intake import PreparedRequest
from .core.request import Overloaded, RequestOutput
from .core.sampling_params import SamplingParams

log = logging.getLogger("gpt_engine.engine")
STOP_JOIN_S = 10.0   # how long stop() waits for the loop: a hung step must not hang shutdown


class EngineClient(Protocol):
    """The engine as the server sees it."""
    tokenizer: object            # encode(text) -> ids, decode(ids) -> text, vocab_size
    model_name: str
    max_model_len: int
    vocab_size: int

    @property
    def is_running(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def prepare(self, prompt, sampling: SamplingParams | dict | None = None, **kwargs) -> PreparedRequest:
        """Default, tokenize and check a request (LLM.prepare): RequestError (a ValueError) for one
        the engine would refuse."""

    def generate(self, prompt, sampling=None, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """prompt: a PreparedRequest (from prepare), or text / token ids prepared with sampling."""

    def compile_ahead(self, structured_outputs) -> None:
        """Start a request's structured-outputs constraint (its fields) compiling before prepare; what
        is wrong with it, prepare reports."""

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    def admit(self, request_ids: list[str]) -> None:
        """Hold room for these requests (before a response starts); Overloaded when they would pass
        the engine's bound."""


class AsyncLLM:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.tokenizer, self.model_name = llm.tokenizer, llm.model_name
        self.max_model_len, self.vocab_size = llm.max_model_len, llm.vocab_size
        self._lock = threading.Lock()           # guards _pending
        self._pending: list = []                # ("add", PreparedRequest, request_id) | ("abort", request_id)
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._admitted: set[str] = set()        # admitted, generate() not yet called
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        cfg = llm.config
        # every waiting sequence needs at least one block once admitted: more waiting than the pool
        # (or the batch) holds would only keep clients that cannot run for several turns of it
        waiting = cfg.max_waiting_seqs or max(cfg.max_num_seqs, llm.block_manager.num_blocks)
        self.max_inflight = cfg.max_inflight_requests or (cfg.max_num_seqs + waiting)
        self.step_timeout = cfg.step_timeout
        self._step_start: float | None = None   # monotonic start of the step in progress
        self._watchdog: threading.Thread | None = None
        if llm.workers is not None:  # a tensor-parallel rank that dies fails the engine at once
            llm.workers.on_death = self._fail

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

    def admit(self, request_ids: list[str]) -> None:
        """The one admission bound: room for these requests is held from now until each ends (or is
        aborted), so admitting a whole API request's choices at once cannot overshoot."""
        if len(self._queues) + len(request_ids) > self.max_inflight:
            raise Overloaded(f"the server holds {len(self._queues)} requests (max_inflight_requests "
                             f"{self.max_inflight}); retry later")
        if len(set(request_ids)) != len(request_ids) or any(rid in self._queues for rid in request_ids):
            raise ValueError(f"duplicate request id among {request_ids!r}")
        loop = asyncio.get_running_loop()
        for rid in request_ids:
            self._queues[rid] = (loop, asyncio.Queue())
            self._admitted.add(rid)

    def prepare(self, prompt, sampling: SamplingParams | dict | None = None, **kwargs) -> PreparedRequest:
        return self.llm.prepare(prompt, sampling, **kwargs)

    def compile_ahead(self, structured_outputs) -> None:
        self.llm.compile_ahead(structured_outputs)

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
        self._admitted.clear()

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
        self._admitted.discard(rid)

    def _loop(self) -> None:
        llm = self.llm
        try:
            while True:
                with self._lock:
                    while not self._pending and not llm.has_unfinished() and not self._stopping:
                        self._wake.wait()
                    pending, self._pending = self._pending, []
                    stopping = self._stopping
                for op, *args in pending:
                    if op == "add":
                        try:
                            llm.add_request(args[0], request_id=args[1], stream=True)
                        except Exception as e:
                            self._end(args[1], e)
                    else:  # the stream (if anyone still reads it) ends unfinished
                        llm.abort(args[0])
                        self._end(args[0])
                if stopping:
                    for rid in llm.abort_all():
                        self._end(rid)
                    return
                if self._error is not None:  # the watchdog gave up on a step that has now returned
                    return
                if llm.has_unfinished():
                    self._step_start = time.monotonic()
                    outs = llm.step()
                    self._step_start = None
                    if self._error is not None:
                        return
                    for out in outs:
                        if out.error is not None:  # dropped by the engine: the stream raises it
                            self._end(out.request_id, out.error)
                            continue
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

    async def generate(self, prompt, sampling: SamplingParams | dict | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The outputs of a request as the engine steps: a PreparedRequest (nothing is checked again),
        or a prompt and its sampling, prepared here. A server admits (admit) before it prepares, so
        that its requests count against the bound before a response starts."""
        if self._error is not None:
            raise RuntimeError(f"engine loop died: {type(self._error).__name__}: {self._error}")
        if not self.is_running:
            raise RuntimeError("the engine is not running (call await engine.start())")
        request = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, sampling)
        if request_id is None:
            request_id = f"async-{next(self._ids)}"
        if request_id in self._admitted:
            self._admitted.discard(request_id)
        else:
            self.admit([request_id])
        q = self._queues[request_id][1]
        with self._lock:
            if self._error is not None:  # failed meanwhile: nobody would post to this queue
                self._queues.pop(request_id, None)
                raise RuntimeError(f"engine loop died: {type(self._error).__name__}: {self._error}")
            self._pending.append(("add", request, request_id))
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
