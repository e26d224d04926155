"""LLM: offline batched generation; AsyncLLM: the streaming engine the server drives.

    llm = LLM("path/to/model")
    outs = llm.generate(["Hello", "The"], SamplingParams(max_tokens=32, temperature=0))

One engine step = schedule (scheduler.py) -> one model.step + batched sampling (runner.py)
-> append tokens, detokenize, check stop conditions.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

from .kv_cache import BlockManager
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, Sequence


@dataclass
class RequestOutput:
    """A request's state. From LLM.generate: the final result. From AsyncLLM.generate: one
    delta per step (new_*) plus everything so far (token_ids, text)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated ids only
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None                     # None | "stop" | "length"
    logprobs: list[dict[int, float]] | None = None       # per generated token: {token_id: logprob} (chosen + top-N)
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[dict[int, float]] | None = None


class _Detokenizer:
    """Incremental text for one request: prefix/read offsets (vLLM-style) so each step decodes
    a few tokens, not the whole output; stop strings cut the text; text that may be the start
    of a stop string (or an incomplete UTF-8 character) is held back from the stream."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""
        self.emitted = 0

    def push(self, ids: list[int]) -> bool:
        """Add tokens; returns True when a stop string appeared (text is cut before it)."""
        self.ids.extend(ids)
        before = len(self.text)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.text += full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.stop and len(self.text) > before:
            lo = max(0, before - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return True
        return False

    def flush(self) -> None:
        """At the end: whatever is still pending (an incomplete character) becomes text."""
        if self.read < len(self.ids):
            prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
            self.text += self.tok.decode(self.ids[self.prefix:])[len(prefix_text):]
            self.read = len(self.ids)

    def delta(self, finished: bool) -> str:
        safe = len(self.text)
        if not finished:
            for s in self.stop:  # hold back a suffix that could grow into a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out


class _Request:
    """Per-request state the engine keeps beside the Sequence (Sequence.data)."""
    __slots__ = ("prompt", "detok", "generator", "logprobs", "stream", "stop_ids", "n_sent")

    def __init__(self, prompt, detok, generator, stream):
        self.prompt, self.detok, self.generator, self.stream = prompt, detok, generator, stream
        self.logprobs: list | None = None
        self.n_sent = 0


ENGINE_DEFAULTS = dict(max_num_seqs=256, max_num_batched_tokens=None, max_model_len=None, block_size=16,
                       num_kv_blocks=None, kv_cache_tokens=None, gpu_memory_utilization=0.9,
                       enable_prefix_caching=True, enforce_eager=None, seed=None)


class LLM:
    """Offline engine over model (an HF-format directory or a GPT module). On CPU it packs the
    model's GEMM weights once at start (GPT.pack_for_cpu): later changes to a given module's
    weights do not reach it."""

    def __init__(self, model, device=None, dtype=None, tokenizer=None, **engine_args):
        unknown = set(engine_args) - set(ENGINE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown engine arguments {sorted(unknown)}; known: {sorted(ENGINE_DEFAULTS)}")
        a = {**ENGINE_DEFAULTS, **engine_args}
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, (str, Path)):
            from .tokenizer import Tokenizer
            from .weights import load_model
            path = Path(model)
            if dtype is None and device.type == "cuda":
                dtype = torch.bfloat16  # fp32 checkpoints serve in bf16 on GPU
            model_obj = load_model(path, device=device, dtype=dtype)
            self.model_name = path.resolve().name
            if tokenizer is None and (path / "tokenizer.json").is_file():
                tokenizer = Tokenizer.load(path)
        else:
            model_obj = model.to(device=device, dtype=dtype).eval() if dtype else model.to(device).eval()
            self.model_name = getattr(model, "name", None) or "gpt"
        self.model, self.tokenizer = model_obj, tokenizer
        cfg = model_obj.config
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(a["max_model_len"] or cfg.max_seq_len, cfg.max_seq_len)
        self.eos_token_id = cfg.eos_token_id
        if self.eos_token_id is None and tokenizer is not None:
            self.eos_token_id = tokenizer.eos_token_id
        mbt = a["max_num_batched_tokens"] or (8192 if device.type == "cuda" else 2048)
        self.runner = ModelRunner(model_obj, block_size=a["block_size"], max_num_seqs=a["max_num_seqs"],
                                  max_num_batched_tokens=mbt, max_model_len=self.max_model_len,
                                  num_kv_blocks=a["num_kv_blocks"], kv_cache_tokens=a["kv_cache_tokens"],
                                  gpu_memory_utilization=a["gpu_memory_utilization"],
                                  enforce_eager=a["enforce_eager"], seed=a["seed"])
        self.block_manager = BlockManager(self.runner.num_blocks, a["block_size"], a["enable_prefix_caching"])
        self.scheduler = Scheduler(self.block_manager, a["max_num_seqs"], mbt, self.max_model_len)
        self._ids = itertools.count()
        self.device = device

    # ---------------------------------------------------------------- requests
    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (no tokenizer.json with the model): "
                                 "pass token-id lists or tokenizer=")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids = [int(t) for t in prompt]
            if any(isinstance(t, bool) for t in prompt):
                raise ValueError("token ids must be integers")
            text = None
        if not ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {self.vocab_size})")
        return text, ids

    def validate(self, prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and check a request against the model; ValueError names what is wrong."""
        text, ids = self._tokenize(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{len(ids) + params.max_tokens} exceeds the model's context length "
                             f"({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs ({params.logprobs}) exceeds the vocabulary size ({self.vocab_size})")
        return text, ids

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    stream: bool = False) -> Sequence:
        params = params or SamplingParams()
        text, ids = self.validate(prompt, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(rid, ids, params, self.eos_token_id)
        gen = Sampler.request_generator(params.seed, self.device) if params.seed is not None else None
        detok = _Detokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq.data = _Request(text, detok, gen, stream)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[tuple[Sequence, list[int], list | None]]:
        """One engine step -> (seq, new token ids, new logprobs) for each sequence that advanced."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        tokens, logprobs = self.runner.run(batch)
        got = self.scheduler.postprocess(batch, tokens)
        out = []
        for i in got:
            seq = batch.seqs[i]
            r: _Request = seq.data
            lp = [logprobs[i]] if logprobs is not None and seq.params.logprobs is not None else None
            if lp is not None:
                r.logprobs = (r.logprobs or []) + lp
            if r.detok is not None and (r.stream or seq.params.stop):
                # a stop token (eos, stop_token_ids) ends the request but adds no text
                if r.detok.push([] if seq.finish_reason == "stop" else [seq.token_ids[-1]]):
                    if seq.is_finished:
                        seq.finish_reason = "stop"
                    else:
                        self.scheduler.finish(seq, "stop")
                elif seq.is_finished:
                    r.detok.flush()
            out.append((seq, [seq.token_ids[-1]], lp))
        return out

    def _catch_up_text(self, seq: Sequence) -> str:
        """Text of a non-streamed request without stop strings: decoded once at the end."""
        r: _Request = seq.data
        if r.detok is None:
            return ""
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and ids and not seq.params.stop:
            ids = ids[:-1]  # eos / stop token: not part of the text
        return self.tokenizer.decode(ids)

    def output(self, seq: Sequence) -> RequestOutput:
        r: _Request = seq.data
        if r.detok is not None and (r.stream or seq.params.stop):
            text = r.detok.text
        else:
            text = self._catch_up_text(seq)
        return RequestOutput(seq.request_id, r.prompt, seq.prompt_token_ids, list(seq.output_token_ids), text,
                             seq.is_finished, seq.finish_reason if seq.is_finished else None, r.logprobs)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        # validate everything before anything runs
        checked = [self.validate(p, sp) for p, sp in zip(prompts, sampling_params)]
        seqs = []
        try:
            for (text, ids), p in zip(checked, sampling_params):
                seqs.append(self.add_request(ids if text is None else text, p))
        except Exception:
            for s in seqs:
                self.abort(s.request_id)
            raise
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(seqs), desc="generate", unit="req", dynamic_ncols=True)
        try:
            pending = set(id(s) for s in seqs)
            while pending:
                for seq, _, _ in self.step():
                    if seq.is_finished and id(seq) in pending:
                        pending.discard(id(seq))
                        if bar is not None:
                            bar.update(1)
                if not self.has_unfinished() and pending:
                    raise RuntimeError("engine stopped with unfinished requests")
        except BaseException:
            for s in seqs:
                self.abort(s.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [self.output(s) for s in seqs]

    def stats(self) -> dict:
        bm = self.block_manager
        return dict(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                    kv_usage=bm.usage, num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
                    prefix_cache_hit_tokens=bm.num_hit_tokens, prefix_cache_query_tokens=bm.num_query_tokens,
                    num_preemptions=self.scheduler.num_preemptions)


class AsyncLLM:
    """Streaming front of an LLM for the server. A background thread runs engine steps; each
    request's deltas travel to its asyncio queue via call_soon_threadsafe, so the event loop
    never blocks on a model step."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._lock = threading.Lock()           # guards _pending (and the LLM's request tables)
        self._pending: list = []                # ("add", seq-args, queue) | ("abort", request_id)
        self._wake = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def model_name(self) -> str:
        return self.llm.model_name

    @property
    def vocab_size(self) -> int:
        return self.llm.vocab_size

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self._error is None

    def stats(self) -> dict:
        return self.llm.stats()

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

    def _loop(self) -> None:
        llm = self.llm
        try:
            while True:
                with self._lock:
                    while not self._pending and not llm.has_unfinished() and not self._stopping:
                        self._wake.wait()
                    pending, self._pending = self._pending, []
                    stopping = self._stopping
                for op in pending:  # requests enter and leave only here, between steps
                    if op[0] == "add":
                        _, seq_args = op
                        try:
                            llm.add_request(*seq_args, stream=True)
                        except Exception as e:
                            self._post(seq_args[2], e)
                    else:  # the stream (if anyone still reads it) ends unfinished
                        llm.abort(op[1])
                        self._post(op[1], None)
                        self._queues.pop(op[1], None)
                if stopping:
                    for rid in list(llm.scheduler.requests):
                        llm.abort(rid)
                        self._post(rid, None)
                    return
                if not llm.has_unfinished():
                    continue
                for seq, new_ids, new_lp in llm.step():
                    r = seq.data
                    fin = seq.is_finished
                    delta = r.detok.delta(fin) if r.detok is not None else ""
                    out = llm.output(seq)
                    out.new_token_ids, out.new_text, out.new_logprobs = new_ids, delta, new_lp
                    if r.detok is not None and not fin:
                        out.text = r.detok.text[:r.detok.emitted]
                    self._post(seq.request_id, out)
                    if fin:
                        self._post(seq.request_id, None)
                        self._queues.pop(seq.request_id, None)
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
        llm = self.llm
        # validate here (raises ValueError before anything is yielded); the loop re-checks cheaply
        params = params or SamplingParams()
        llm.validate(prompt, params)
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), q)
        with self._lock:
            self._pending.append(("add", (prompt, params, request_id)))
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
