"""LLM: the offline engine. Requests in, one step at a time, RequestOutputs out.

    llm = LLM("path/to/model")
    outs = llm.generate(["Hello", "The"], SamplingParams(max_tokens=32, temperature=0))

A request is prepared once (core/intake.py: defaults, tokens, checks), then each step: the
scheduler picks the batch (core/scheduler.py) -> the runner computes it and samples
(worker/model_runner.py) -> the scheduler appends the tokens -> check_stop decides who is done ->
outputs for streamed and finished requests. AsyncLLM (async_llm.py) drives the same steps
for the server.
"""
from __future__ import annotations

import functools
import itertools
import logging
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .chat_template import ChatTemplate, missing_template
from .engine_config import EngineConfig
from .core.block_manager import BlockManager
from .core.intake import Intake, PreparedRequest
from .core.lora import LoRARequest
from .core.request import Request, RequestError, RequestOutput, check_stop
from .worker.model_runner import ModelRunner
from .core.sampling_params import SamplingParams
from .core.scheduler import Scheduler, Sequence
from .core.spec_decode import SpeculativeConfig, SpecStats, ngram_propose
from .core.structured import Grammars, StructuredOutputs

log = logging.getLogger("gpt_engine.llm")


def _half(dtype, device: torch.device) -> bool:
    """A 16-bit float dtype asked for on CPU: a storage format there, compute being float32."""
    return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)


def build_model(model, cfg: EngineConfig, device: torch.device, tp=None, tokenizer=None):
    """The model as the engine runs it (this rank's shard with tp) -> (model, tokenizer, eos ids, default
    sampling settings, name). model: an HF-format directory or a GPT module."""
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    default_sampling: dict = {}  # what the model directory says about generation
    if isinstance(model, (str, Path)):
        from .models.generation_config import load_generation_config
        from .tokenizer import Tokenizer
        from .models.loader import load_model
        path = Path(model)
        if dtype is None and device.type == "cuda":
            dtype = torch.bfloat16  # fp32 checkpoints serve in bf16 on GPU
        load_dtype = torch.float32 if _half(dtype, device) else dtype
        if tp is None:
            model_obj = load_model(path, device=device, dtype=load_dtype)
        else:  # the whole model in host memory, then this rank's slice on its device
            model_obj = load_model(path, device="cpu", dtype=load_dtype).shard(tp).to(device)
        name = path.resolve().name
        if tokenizer is None and ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
            tokenizer = Tokenizer.load(path)
        gen = load_generation_config(path, tokenizer, model_obj.config.vocab_size)
        eos, default_sampling = gen.eos_token_ids, gen.sampling
    else:
        model_obj = model.to(device=device, dtype=torch.float32 if _half(dtype, device) else dtype).eval() \
            if dtype else model.to(device).eval()
        name = getattr(model, "name", None) or "gpt"
        eos = [model_obj.config.eos_token_id] if model_obj.config.eos_token_id is not None else \
            list(getattr(tokenizer, "eos_token_ids", None) or [])
    # CPU: bf16/fp16 weights are stored at that precision (rounded, and packed in bf16) while compute
    # and the KV cache stay float32, which the CPU kernels run; a half checkpoint loads the same way
    held = next(model_obj.parameters()).dtype
    storage = dtype if _half(dtype, device) else held if _half(held, device) else None
    if storage is not None and held != torch.float32:
        model_obj = model_obj.float()
    # a model loaded here is the engine's own: on CPU its GEMM weights then live in their packs only
    owned = isinstance(model, (str, Path)) and device.type == "cpu"
    if storage is not None or cfg.quantization is not None or owned:
        model_obj.set_weight_format(storage, cfg.quantization, cfg.quantization_group_size, release=owned)
    return model_obj, tokenizer, eos, default_sampling, name


def build_runner(model, cfg: EngineConfig, eos_token_ids) -> ModelRunner:
    mcfg = model.config
    return ModelRunner(model, block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs,
                       max_num_batched_tokens=cfg.max_num_batched_tokens,
                       max_model_len=min(cfg.max_model_len or mcfg.max_seq_len, mcfg.max_seq_len),
                       num_kv_blocks=cfg.num_kv_blocks, kv_cache_tokens=cfg.kv_cache_tokens,
                       gpu_memory_utilization=cfg.gpu_memory_utilization,
                       enforce_eager=cfg.enforce_eager, seed=cfg.seed, eos_token_ids=eos_token_ids,
                       max_loras=cfg.max_loras if cfg.enable_lora else 0, max_lora_rank=cfg.max_lora_rank,
                       kv_cache_dtype=cfg.kv_cache_dtype)


def _stop_workers(comm, workers) -> None:
    if workers.failed is None and not workers.closing:
        try:
            comm.broadcast_object(None)  # the workers' loop ends
            comm.close()
        except Exception:
            pass
    workers.join()


def _per_prompt(lora_request, n: int) -> list:
    """generate's lora_request (one for all, or a list of one per prompt) as a list of n."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    loras = list(lora_request)
    if len(loras) != n:
        raise ValueError(f"got {len(loras)} lora requests for {n} prompts")
    return loras


class LLM:
    """Offline engine over model (an HF-format directory or a GPT module). Settings are
    EngineConfig's fields, as keyword arguments or as config=. On CPU it packs the model's GEMM
    weights once at start (GPT.pack_for_cpu): later changes to a given module's weights do not
    reach it, and a model loaded from a directory keeps them only in the packs (inference only:
    no state dict, no training). quantization="int8" quantises the GEMM weights at load (GPT.set_weight_format; a
    given module is changed in place); on CPU a bfloat16/float16 dtype is the weights' storage,
    compute and the KV cache staying float32."""

    def __init__(self, model, device=None, dtype=None, quantization=None, tokenizer=None,
                 config: EngineConfig | None = None, **engine_args):
        unknown = set(engine_args) - EngineConfig.names()
        if unknown:
            raise TypeError(f"unknown engine arguments {sorted(unknown)}; known: {sorted(EngineConfig.names())}")
        base = asdict(config) if config is not None else {}
        given = {k: v for k, v in dict(device=device, dtype=dtype, quantization=quantization).items() if v is not None}
        cfg = EngineConfig(**{**base, **given, **engine_args})
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = cfg = cfg.resolved(device.type)
        self.workers = tp = None
        if cfg.tensor_parallel_size > 1:
            if not isinstance(model, (str, Path)):
                raise ValueError("tensor_parallel_size > 1 needs a model directory (every rank loads its shard)")
            if cfg.enable_lora:
                raise ValueError("enable_lora with tensor_parallel_size > 1 is not supported yet (the adapters are "
                                 "not sharded)")
            from .models.parallel import TPGroup
            from .worker import tensor_parallel
            comm, self.workers, rank, device = tensor_parallel.start(cfg.tensor_parallel_size, str(model), cfg,
                                                                     device)
            if rank != 0:  # another node's first rank (or a torchrun rank): a worker until rank 0 ends
                tensor_parallel.run_worker(comm, str(model), cfg, device)
                self.workers.join()
                raise SystemExit(0)
            tp = TPGroup(0, cfg.tensor_parallel_size, comm)
            # the workers stop when the engine is closed, collected or the interpreter exits
            self._close = weakref.finalize(self, _stop_workers, comm, self.workers)
        self.device = device
        try:
            model_obj, tokenizer, eos, self.default_sampling, self.model_name = build_model(model, cfg, device, tp,
                                                                                            tokenizer)
            self.runner = build_runner(model_obj, cfg, eos)
        except BaseException as e:
            if self.workers is not None:
                self.workers.join(0)
                if self.workers.failed is not None:
                    raise self.workers.failed from e
            raise
        self.model, self.tokenizer = model_obj, tokenizer
        self.chat_template = ChatTemplate.of_tokenizer(tokenizer) if tokenizer is not None else None
        mcfg = model_obj.config
        self.vocab_size = mcfg.vocab_size
        self.eos_token_ids = frozenset(eos)
        max_model_len = self.runner.max_model_len
        # a model windowed in every layer keeps only the window's blocks; one global layer needs them all
        window = mcfg.sliding_window if all(mcfg.windowed) else 0
        self.block_manager = bm = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                               sliding_window=window)
        pool = bm.capacity * bm.block_size
        # a longer request could never fit: the context is what the pool holds
        if pool < bm.held_tokens(max_model_len):
            if cfg.max_model_len is not None:
                raise ValueError(f"max_model_len {cfg.max_model_len} is more than the KV cache holds ({pool} tokens "
                                 f"in {bm.capacity} blocks): lower max_model_len or give the cache more room")
            log.warning("the KV cache holds %d tokens: max_model_len %d -> %d", pool, max_model_len, pool)
            max_model_len = pool
        self.max_model_len = max_model_len
        self.runner.start(max_model_len)
        self.scheduler = Scheduler(bm, cfg.max_num_seqs, cfg.max_num_batched_tokens, max_model_len,
                                   max_loras=cfg.max_loras if cfg.enable_lora else None)
        self.grammars = Grammars(tokenizer, self.vocab_size, eos)
        self.intake = Intake(tokenizer, self.vocab_size, max_model_len, bm, self.default_sampling, self.grammars)
        self.structured = StructuredOutputs(self.vocab_size, eos)
        self.requests: dict[str, Request] = {}   # the one registry of live requests
        self.num_constrained = 0                 # live requests with a matcher: no bitmask work without
        self.spec = spec = SpeculativeConfig.of(cfg.speculative_config)
        self.spec_stats = SpecStats()
        self.drafter = None
        if spec is not None and spec.method == "draft_model":
            if self.workers is not None:
                raise ValueError("speculative_config: a draft model with tensor_parallel_size > 1 is not supported "
                                 "yet (n-gram speculation is)")
            if window:
                raise ValueError("speculative_config: a draft model over a sliding-window model is not supported yet "
                                 "(n-gram speculation is)")
            from .worker.draft import DraftModel
            self.drafter = DraftModel(spec.model, cfg, self.runner, tokenizer, device)
        self._ids = itertools.count()

    # ---------------------------------------------------------------- requests
    def prepare(self, prompt, sampling: SamplingParams | dict | None = None, lora_request: LoRARequest | None = None,
                **kwargs) -> PreparedRequest:
        """Default, tokenize and check a request once (Intake.prepare); add_request takes the result.
        lora_request: the LoRA adapter it runs with (enable_lora), checked here."""
        if lora_request is not None:
            self.check_lora(lora_request)
        request = self.intake.prepare(prompt, sampling, **kwargs)
        return request if lora_request is None else replace(request, lora=lora_request)

    def compile_ahead(self, structured_outputs) -> None:
        """Start a request's constraint compiling before the request is prepared (Intake.compile_ahead)."""
        self.intake.compile_ahead(structured_outputs)

    def check_lora(self, lora_request: LoRARequest) -> None:
        """RequestError (a ValueError) naming what is wrong when this engine cannot serve the adapter: LoRA
        not enabled, a directory that is no PEFT LoRA adapter of this model, a rank above max_lora_rank."""
        if self.runner.loras is None:
            raise RequestError("LoRA adapters need an engine started with enable_lora=True", "lora_request")
        try:
            self.runner.loras.check(lora_request)
        except ValueError as e:
            raise RequestError(str(e), "lora_request") from None

    def add_request(self, prompt, sampling: SamplingParams | dict | None = None, request_id: str | None = None,
                    stream: bool = False) -> Sequence:
        """Queue a request: a PreparedRequest (from prepare: nothing is checked again), or a prompt and
        its sampling, prepared here."""
        request = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, sampling)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"duplicate request id {rid!r}")
        # its prefill runs while the grammar may still compile; its first sample waits for the grammar (held
        # back by the scheduler while other sequences run)
        seq = Sequence(rid, request.prompt_token_ids, request.params, request.lora, request.grammar)
        self.scheduler.add(seq)
        self.requests[rid] = Request(seq, request.prompt, self.tokenizer, self.eos_token_ids, stream, request.grammar)
        self.num_constrained += request.grammar is not None
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request now, freeing its blocks. Returns whether it was live."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.num_constrained -= req.grammar is not None
        self.scheduler.finish(req.seq, "abort")
        return True

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do without them); the engine cannot step after."""
        if self.workers is not None:
            self._close()

    def abort_all(self) -> list[str]:
        ids = list(self.requests)
        for rid in ids:
            self.abort(rid)
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """One engine step -> an output for every streamed request that advanced (with its delta)
        and for every request that finished."""
        if self.workers is not None and (self.workers.failed or self.workers.closing):
            raise RuntimeError("the tensor-parallel workers are gone") from self.workers.failed
        batch = self.scheduler.schedule()
        if self.num_constrained:
            batch.grammar_bitmask = functools.partial(self.structured.bitmask, batch, self.requests)
        tokens, logprobs, scored = self.runner.run(batch)
        if scored is not None:
            for seq, rows in zip(batch.seqs, scored):
                req = self.requests.get(seq.request_id)
                if rows is not None and req is not None:  # None: aborted while the step ran
                    req.prompt_logprobs.extend(rows)
        outs = []
        for i in self.scheduler.postprocess(batch, tokens):
            seq = batch.seqs[i]
            req = self.requests[seq.request_id]
            new = tokens[i] if isinstance(tokens[i], list) else [tokens[i]]  # a list: verified drafts
            if batch.spec is not None and batch.spec[i]:
                self.spec_stats.add(len(batch.spec[i]), len(new) - 1)
            # the stop checks see one token at a time: the tokens after a stop are dropped
            base = len(seq.token_ids) - len(new)
            del seq.token_ids[base:]
            reason = None
            for tok in new:
                seq.token_ids.append(tok)
                if req.matcher is not None:
                    self.structured.advance(req, tok)
                reason = "abort" if req.error is not None else check_stop(req, self.max_model_len)
                if reason is not None:
                    break
            emitted = seq.token_ids[base:]
            lp = None
            if req.logprobs is not None and logprobs is not None:
                lp = (logprobs[i] if isinstance(logprobs[i], list) else [logprobs[i]])[:len(emitted)]
                req.logprobs.extend(lp)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
                self.num_constrained -= req.grammar is not None
            if reason is not None or req.stream:
                outs.append(req.output(emitted, lp))
        if self.spec is not None:
            self._propose(batch.finished_ids)
        return outs

    def _propose(self, finished_ids) -> None:
        """Draft tokens for the next step of every decoding sequence (speculative decoding). Constrained
        requests decode plainly."""
        spec, running, bm = self.spec, self.scheduler.running, self.block_manager
        if self.drafter is not None:
            self.drafter.release(finished_ids)
        if spec.disable_by_batch_size is not None and len(running) >= spec.disable_by_batch_size:
            return
        seqs, ks = [], []
        for seq in running:
            req = self.requests.get(seq.request_id)
            if req is None or req.grammar is not None or seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            # the step emits the accepted drafts and one more: no drafts past max_tokens or the context
            k = min(spec.num_speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens - 1)
            if k <= 0:
                continue
            if self.drafter is None:
                seq.spec_token_ids = ngram_propose(seq.token_ids, k, spec.prompt_lookup_max, spec.prompt_lookup_min)
            elif bm.can_append(seq.block_table, seq.num_tokens + k):  # the draft model writes their slots
                bm.append(seq.block_table, seq.num_tokens + k)
                seqs.append(seq)
                ks.append(k)
        if seqs:
            for seq, drafts in zip(seqs, self.drafter.propose(seqs, ks)):
                seq.spec_token_ids = drafts

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """lora_request: one LoRARequest for every prompt, or a list with one (or None: the base model)
        per prompt (enable_lora)."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        loras = _per_prompt(lora_request, len(prompts))
        # without sampling params: the model's generation_config.json defaults, else SamplingParams'
        default_max = SamplingParams.max_tokens
        return self.run_prepared([self.prepare(p, sp, lora, default_max_tokens=default_max)  # all checked first
                                  for p, sp, lora in zip(prompts, sampling_params, loras)], use_tqdm)

    def run_prepared(self, requests: list[PreparedRequest], use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prepared requests to the end -> their outputs in order."""
        rids = []
        bar = None
        try:
            for r in requests:
                rids.append(self.add_request(r).request_id)
            if use_tqdm:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(rids), desc="generate", unit="req", dynamic_ncols=True)
            done: dict[str, RequestOutput] = {}
            wanted = set(rids)
            while len(done) < len(rids):
                if not self.has_unfinished():
                    raise RuntimeError("engine stopped with unfinished requests")
                for out in self.step():
                    if out.error is not None and out.request_id in wanted:
                        raise out.error
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in rids:
                self.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in rids]

    def template(self, source: str | None = None, hint: str = "pass chat_template=") -> ChatTemplate:
        """The chat template: source (a jinja string) if given, else the model's own; a clear error
        (with hint: how to give one) when there is none."""
        if source is None and self.chat_template is not None:
            return self.chat_template
        template = ChatTemplate.of_tokenizer(self.tokenizer, source) if self.tokenizer is not None else None
        if template is None:
            raise missing_template(hint)
        return template

    def chat(self, messages, sampling_params=None, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, rendered by the model's
        chat template (or chat_template, a jinja string) as transformers' apply_chat_template
        renders it, with tools (function definitions, as OpenAI's request carries them) when given;
        each output's .prompt is the rendered text. Tool calls in the output are not parsed (the
        server's --tool-call-parser does that). lora_request: as generate's, one per conversation."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = self.template(chat_template)
        loras = _per_prompt(lora_request, len(convs))
        # the template carries its BOS
        return self.run_prepared([self.prepare(template.render(c, add_generation_prompt, tools), sampling_params,
                                               lora, add_special_tokens=False,
                                               default_max_tokens=SamplingParams.max_tokens, param="messages")
                                  for c, lora in zip(convs, loras)], use_tqdm)

    def stats(self) -> dict:
        bm = self.block_manager
        return dict(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                    kv_usage=bm.usage, num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.capacity,
                    prefix_cache_hit_tokens=bm.num_hit_tokens, prefix_cache_query_tokens=bm.num_query_tokens,
                    num_preemptions=self.scheduler.num_preemptions, **self.spec_stats.as_dict())
