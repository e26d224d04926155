"""AsyncLLM: the streaming engine the server drives, and EngineClient, what the server needs
of an engine.

A background thread runs LLM.step(); each RequestOutput travels to its request's asyncio
queue via call_soon_threadsafe, so the event loop never blocks on a model step. Requests
enter and leave the LLM only on that thread, between steps.
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Protocol

from .llm import LLM
from .request import RequestOutput
from .sampling import SamplingParams


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

    def validate(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """RequestError (a ValueError) for a request the engine would refuse."""

    def generate(self, prompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...


class AsyncLLM:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.tokenizer, self.model_name = llm.tokenizer, llm.model_name
        self.max_model_len, self.vocab_size = llm.max_model_len, llm.vocab_size
        self._lock = threading.Lock()           # guards _pending
        self._pending: list = []                # ("add", prompt, params, request_id) | ("abort", request_id)
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self._error is None

    def stats(self) -> dict:
        return self.llm.stats()

    def validate(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        return self.llm.validate(prompt, params)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.is_running:
            return
        self._stopping, self._error = False, None
        self._thread = threading.Thread(target=self._loop, name="gpt-engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort in-flight requests (their iterators end unfinished) and stop the loop."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

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
                            llm.add_request(*args, stream=True)
                        except Exception as e:
                            self._end(args[2], e)
                    else:  # the stream (if anyone still reads it) ends unfinished
                        llm.abort(args[0])
                        self._end(args[0])
                if stopping:
                    for rid in llm.abort_all():
                        self._end(rid)
                    return
                if llm.has_unfinished():
                    for out in llm.step():
                        self._post(out.request_id, out)
                        if out.finished:
                            self._end(out.request_id)
        except BaseException as e:
            self._error = e
            err = RuntimeError(f"engine loop died: {type(e).__name__}: {e}")
            for rid in list(self._queues):
                self._post(rid, err)
            self._queues.clear()

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
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), q)
        with self._lock:
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
