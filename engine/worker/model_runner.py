"""Model runner: owns the paged KV cache, turns a ScheduledBatch into packed tensors and one
model.step call, and samples the whole batch at once. On CUDA, pure-decode steps replay
CUDA graphs captured per padded batch size.

It sees only what the scheduler hands it (the batch's sequences, their block tables and
sampling parameters, the ids of requests that ended); what it keeps per request (a seeded
request's generator, its padded block-table row) it drops when the batch says the request ended."""
from __future__ import annotations

import array
import itertools
import logging
from dataclasses import dataclass

import torch

from gpt_engine.kernels.reference import KV_QMAX

from ..engine_config import KV_CACHE_DTYPES
from ..worker import hugepages
from .lora import LoRAManager
from ..models.layers import StepMeta
from ..models.rope import seq_dependent_rope
from .sampler import Sampler
from .scoring import prompt_logprobs, score_rows
from ..core.scheduler import ScheduledBatch

log = logging.getLogger("gpt_engine.worker.model_runner")


_TYPECODE = {torch.long: "q", torch.int32: "i"}


def host_tensor(data, dtype) -> torch.Tensor:
    """A 1-D CPU tensor of the ints in data (a list or array.array), built through array.array:
    torch.tensor on a Python list inspects every element, and every engine step builds several."""
    a = data if isinstance(data, array.array) else array.array(_TYPECODE[dtype], data)
    return torch.frombuffer(a, dtype=dtype) if len(a) else torch.empty(0, dtype=dtype)


def padded_tables(tables: list[list[int]], width: int) -> array.array:
    """The block tables as one flat int32 array, each row zero-padded to width."""
    out, zeros = array.array("i"), array.array("i", [0]) * width
    for t in tables:
        out.extend(t)
        out.extend(zeros[:width - len(t)])
    return out


def table_rows(seqs, width: int, kept: dict) -> array.array:
    """padded_tables of the sequences' block tables, each row built once and kept (in kept, by
    request id) until its table grows or is replaced: rebuilding every row each step is most of
    the input preparation at hundreds of sequences. A table only ever grows in place or is
    replaced by a new list (cleared, or with the blocks behind a sliding window released:
    kv_cache.BlockManager.slide), so the same list at the same length holds the same blocks."""
    rows = []
    for s in seqs:
        t, row = s.block_table, kept.get(s.request_id)
        if row is None or row[0] is not t or row[1] != len(t) or row[2] != width:
            row = kept[s.request_id] = (t, len(t), width, padded_tables([t], width).tobytes())
        rows.append(row[3])
    out = array.array("i")
    out.frombytes(b"".join(rows))
    return out


@dataclass
class StepInputs:
    """One step's host-side inputs (ModelRunner.prepare's lists, the padded block tables): what the model
    step needs and nothing of the scheduler's, so tensor-parallel workers get it as it is."""
    ids: list
    pos: list
    slots: list
    seq_lens: list
    cu_q: list
    cu_k: list
    tables: array.array         # (B, width) int32, flat
    width: int
    logits_idx: list
    max_seqlen_q: int
    decode: bool
    rope_lens: list | None      # dynamic/longrope: each token's rotation length, where not position + 1
    score: tuple | None         # scoring.score_rows's (rows, targets, tops, spans)


def graph_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class ModelRunner:
    def __init__(self, model, block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 1024, num_kv_blocks: int | None = None, kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool | None = None, seed: int | None = None,
                 eos_token_ids=(), max_loras: int = 0, max_lora_rank: int = 16, kv_cache_dtype: str = "auto"):
        self.model = model
        self.tp = model.tp  # a tensor-parallel rank: the ranks agree on the pool and run each step together
        self.eos_token_ids = list(eos_token_ids)   # min_tokens bans them with each request's stop_token_ids
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.max_num_batched_tokens, self.max_model_len = max_num_batched_tokens, max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.cuda = self.device.type == "cuda"
        self.vocab_size = cfg.vocab_size
        self.seq_rope = seq_dependent_rope(cfg)
        self.sampler = Sampler(seed)
        self.generators: dict[str, torch.Generator] = {}   # seeded requests' own random streams
        self.rows: dict[str, tuple] = {}                    # table_rows' kept rows
        # LoRA slots (max_loras > 0), allocated before the KV cache is sized to what is left
        self.loras = LoRAManager(model, max_loras, max_lora_rank, self.dtype, self.device) if max_loras else None
        self.kv_dtype = self._kv_dtype(kv_cache_dtype)
        self.num_blocks = self._num_blocks(num_kv_blocks, kv_cache_tokens, gpu_memory_utilization)
        if self.tp is not None:
            self.num_blocks = self.tp.comm.min(self.num_blocks)
        # one allocation: (2, n_layer, blocks, block_size, hkv, d); zeros so padded graph rows read finite values
        shape = (2, cfg.n_layer, self.num_blocks, block_size, model.kv_heads, cfg.head_dim)
        if self.device.type == "cpu":  # CPU steps stream the cache and the weights from DRAM: huge pages spare the TLB
            self.kv = hugepages.zeros(shape, self.kv_dtype)
            hugepages.adopt([*model.parameters(), *model.buffers(), *model.pack_for_cpu()])
        else:
            self.kv = torch.zeros(shape, device=self.device, dtype=self.kv_dtype)
        # int8 / fp8: an fp32 scale per (k|v, layer, slot, kv head) beside the pool (kernels.store_kvcache
        # writes it)
        self.kv_scale = torch.zeros(shape[:-1], device=self.device) if self.kv_dtype in KV_QMAX else None
        self.kv_caches = [(self.kv[0, i], self.kv[1, i]) + (() if self.kv_scale is None else
                                                              (self.kv_scale[0, i], self.kv_scale[1, i]))
                          for i in range(cfg.n_layer)]
        self.graphs: dict[int, tuple] = {}
        # graphs would capture the tensor-parallel collectives: eager there
        self.enforce_eager = (not self.cuda if enforce_eager is None else enforce_eager) or self.tp is not None

    def start(self, max_model_len: int) -> None:
        """The context length the engine settled on once the KV pool was sized (never above the one
        it was built with): decode graphs are captured for it."""
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        if not self.enforce_eager and self.cuda:
            try:
                self._capture()
            except Exception as e:  # never fatal: eager decode is correct, only slower
                log.warning("CUDA graph capture failed, running eager: %s", e)
                self.graphs = {}

    # ---------------------------------------------------------------- KV cache size
    def _kv_dtype(self, kv_cache_dtype: str) -> torch.dtype:
        """The pool's storage dtype: the compute dtype ("auto"), bfloat16, int8, or fp8 (e4m3), which the
        kernels read as stored: the C++ ones on CPU (no fp8), the Triton ones on CUDA (fp8 from compute
        capability 8.9, Ada/Hopper, whose conversions Triton's fp8 needs)."""
        if kv_cache_dtype == "auto":
            return self.dtype
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else getattr(torch, kv_cache_dtype)
        if self.device.type not in ("cpu", "cuda") and dtype != self.dtype:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} runs on CPU and CUDA: on {self.device.type} the KV "
                             f"cache holds the compute dtype ({self.dtype}), kv_cache_dtype='auto'")
        if kv_cache_dtype == "fp8" and not self.cuda:
            raise ValueError("kv_cache_dtype='fp8' needs a GPU (the Triton kernels read it; the CPU kernels do "
                             "not): on CPU use 'int8' (the same bytes) or 'bfloat16'")
        if kv_cache_dtype == "fp8" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError(f"kv_cache_dtype='fp8' needs compute capability 8.9 or newer (Ada, Hopper), "
                             f"{torch.cuda.get_device_name(self.device)} has "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(self.device)))}: use 'int8'")
        return dtype

    def block_bytes(self, dtype: torch.dtype | None = None) -> int:
        """One block's bytes over all layers, K and V, in dtype (default: the pool's), int8's and fp8's scales
        included."""
        cfg, dtype = self.model.config, dtype or self.kv_dtype
        row = cfg.head_dim * dtype.itemsize + (4 if dtype in KV_QMAX else 0)
        return 2 * cfg.n_layer * self.block_size * self.model.kv_heads * row

    def _num_blocks(self, num_kv_blocks, kv_cache_tokens, util) -> int:
        # no point holding more than every sequence at full length
        cap = self.max_num_seqs * self.max_blocks_per_seq + 1
        if num_kv_blocks is not None:
            return int(num_kv_blocks)
        if kv_cache_tokens is not None:
            return max(1, -(-int(kv_cache_tokens) // self.block_size))
        if not self.cuda:  # the bytes of 16384 tokens in the compute dtype: a smaller cache dtype holds more
            return min(cap, 16384 // self.block_size * self.block_bytes(self.dtype) // self.block_bytes())
        # CUDA: what is left of total * util after weights and a prefill-sized activation peak
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.max_num_batched_tokens, self.max_model_len)
        with torch.no_grad():
            ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
            h = self.model.hidden(ids, torch.arange(n, device=self.device)[None])
            self.model.logits(h[0, :self.max_num_seqs]).float().softmax(-1)
        torch.cuda.synchronize()
        peak, current = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        free, total = torch.cuda.mem_get_info()
        avail = total * util - (total - free) - (peak - current)
        blocks = int(avail // self.block_bytes())
        if blocks < self.max_blocks_per_seq:
            raise RuntimeError(f"not enough GPU memory for the KV cache: {blocks} blocks fit, one full-length "
                               f"sequence needs {self.max_blocks_per_seq}; raise gpu_memory_utilization or lower "
                               f"max_model_len")
        return min(blocks, cap)

    # ---------------------------------------------------------------- inputs
    def prepare(self, batch: ScheduledBatch):
        """-> host lists: input ids and positions (N,), slots (N,), seq_lens (B,), cu_seqlens_q/k (B+1,),
        the block tables (unpadded), and logits_indices (S,) of the S sampled rows."""
        bs = self.block_size
        ids, pos, slots, seq_lens, cu_q, cu_k, logits_idx = [], [], [], [], [0], [0], []
        tables = [s.block_table for s in batch.seqs]
        if batch.is_decode:  # one token per sequence: comprehensions, no per-range loop
            pos = [s.num_computed_tokens for s in batch.seqs]
            ids = [s.token_ids[p] for s, p in zip(batch.seqs, pos)]
            slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos)]
            seq_lens = [p + 1 for p in pos]
            logits_idx = [i for i, smp in enumerate(batch.sample) if smp]
            cu_q = list(range(len(ids) + 1))
            cu_k = list(itertools.accumulate(seq_lens, initial=0))
            return ids, pos, slots, seq_lens, cu_q, cu_k, tables, logits_idx
        spec = batch.spec or itertools.repeat(None)
        for seq, n, sample, drafts in zip(batch.seqs, batch.num_new_tokens, batch.sample, spec):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend((seq.token_ids + drafts if drafts else seq.token_ids)[start:end])
            pos.extend(range(start, end))
            table = seq.block_table
            i = start
            while i < end:  # slot ranges block by block, not token by token
                b, off = divmod(i, bs)
                j = min(end, (b + 1) * bs)
                base = table[b] * bs
                slots.extend(range(base + off, base + off + j - i))
                i = j
            seq_lens.append(end)
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + end)
            if sample:  # with drafts, every position's: each verifies the token after it
                logits_idx.extend(range(cu_q[-1] - 1 - len(drafts), cu_q[-1]) if drafts else (cu_q[-1] - 1,))
        return ids, pos, slots, seq_lens, cu_q, cu_k, tables, logits_idx

    def _verify_as_decode(self, batch: ScheduledBatch) -> bool:
        """A speculative step whose every sequence decodes (its last token and its drafts, no prompt
        chunk), on CPU, with nothing that needs the chunked path (scoring, sequence-length rotary)."""
        return (batch.spec is not None and not self.cuda and batch.score is None and not self.seq_rope
                and all(n == 1 + len(d or ()) for n, d in zip(batch.num_new_tokens, batch.spec)))

    def _to(self, data, dtype):
        t = host_tensor(data, dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.cuda else t

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list | None]:
        """One model step -> (logits (S, V) of the sampled rows, in batch order; None, or per sequence
        the prompt logprobs of the positions the batch scores (ScheduledBatch.score))."""
        ids, pos, slots, seq_lens, cu_q, cu_k, tables, logits_idx = self.prepare(batch)
        lora = self.loras.step(batch) if self.loras is not None else None
        # the decode graphs were captured without adapters
        if batch.is_decode and batch.score is None and lora is None and self.graphs and len(batch) <= max(self.graphs):
            return self._replay(ids, pos, slots, seq_lens, batch.seqs)[:len(batch)][
                torch.tensor(logits_idx, device=self.device) if len(logits_idx) != len(batch) else slice(None)], None
        # the width rounded up to a power of two: kept rows stay valid while the batch's longest
        # table grows, and the decode kernel's split-K (sized from the width) stays near the need
        width = min(1 << (max(map(len, tables)) - 1).bit_length(), self.max_blocks_per_seq)
        rope_lens = None
        if self.seq_rope and not batch.is_decode:  # prompts rotated as a whole (dynamic/longrope)
            plen = (s.num_prompt_tokens for s, n in zip(batch.seqs, batch.num_new_tokens) for _ in range(n))
            rope_lens = [max(p + 1, n) for p, n in zip(pos, plen)]
            if rope_lens == [p + 1 for p in pos]:
                rope_lens = None
        tables, decode, max_q = table_rows(batch.seqs, width, self.rows), batch.is_decode, max(batch.num_new_tokens)
        if self._verify_as_decode(batch):
            # each verified position a decode row of its own (its sequence's table, its own length): the
            # step writes every row's K/V before any row attends, so row p sees the drafts before it, and
            # on CPU the layers run as the fused decode layer rather than the chunked-prefill path
            seq_lens = [p + 1 for p in pos]
            cu_q, cu_k = list(range(len(ids) + 1)), list(itertools.accumulate(seq_lens, initial=0))
            tables = array.array("i", itertools.chain.from_iterable(
                tables[i * width:(i + 1) * width] * n for i, n in enumerate(batch.num_new_tokens)))
            decode, max_q = True, 1
        step = StepInputs(ids, pos, slots, seq_lens, cu_q, cu_k, tables, width, logits_idx, max_q, decode, rope_lens,
                          None if batch.score is None else score_rows(batch, cu_q))
        if self.tp is not None:  # every rank runs the same step (tensor_parallel.py)
            self.tp.comm.broadcast_object(step)
        return self.forward(step, lora)

    @torch.no_grad()
    def forward(self, s: "StepInputs", lora=None) -> tuple[torch.Tensor, list | None]:
        """The model step of execute, from its host-side inputs (what a tensor-parallel worker gets); lora:
        the step's LoRAStep (worker/lora.py), with LoRA."""
        table = self._to(s.tables, torch.int32).view(len(s.seq_lens), s.width)
        meta = StepMeta(slot_mapping=self._to(s.slots, torch.long), block_table=table,
                        seq_lens=self._to(s.seq_lens, torch.int32), cu_seqlens_q=self._to(s.cu_q, torch.int32),
                        cu_seqlens_k=self._to(s.cu_k, torch.int32), max_seqlen_q=s.max_seqlen_q,
                        max_seqlen_k=max(s.seq_lens), decode=s.decode, fresh=s.cu_q == s.cu_k, lora=lora)
        if s.rope_lens is not None:
            meta.rope_seq_lens = self._to(s.rope_lens, torch.long)
        li = None if len(s.logits_idx) == len(s.ids) else self._to(s.logits_idx, torch.long)
        ids_t, pos_t = self._to(s.ids, torch.long), self._to(s.pos, torch.long)
        if s.score is None:
            return self.model.step(ids_t, pos_t, self.kv_caches, meta, li), None
        # scoring: every computed position's hidden state is kept for the chunked head (scoring.py)
        h = self.model.hidden(ids_t, pos_t, self.kv_caches, meta)
        rows, targets, tops, spans = s.score
        scored = prompt_logprobs(self.model.logits, h, rows, targets, tops, self.vocab_size)
        logits = self.model.logits(h if li is None else h[li])
        return logits, [scored[a:b] if b > a else None for a, b in spans]

    def release(self, request_ids) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
            self.rows.pop(rid, None)

    def _generator(self, seq) -> torch.Generator | None:
        seed = seq.params.seed
        if seed is None:
            return None
        g = self.generators.get(seq.request_id)
        if g is None:
            g = self.generators[seq.request_id] = Sampler.request_generator(seed, self.device)
        return g

    def _banned(self, seq, ahead: int = 0) -> list[int]:
        """The ids seq may not draw yet (with ahead more tokens in its output): its stop ids while under
        min_tokens (vLLM's min_tokens)."""
        p = seq.params
        if seq.num_output_tokens + ahead >= p.min_tokens:
            return []
        return p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)

    def run(self, batch: ScheduledBatch) -> tuple[list, list | None, list | None]:
        """Step + sample -> (token or None per sequence, logprobs dict or None per sequence, None or per
        sequence its prompt logprobs of this step (a list of dicts) or None)."""
        self.release(batch.finished_ids)
        if not batch.seqs:
            return [], None, None
        logits, scored = self.execute(batch)
        if batch.spec is not None:
            return *self._verify(batch, logits), scored
        rows = [s for s, smp in zip(batch.seqs, batch.sample) if smp]
        if not rows:
            return [None] * len(batch), None, scored
        params = [s.params for s in rows]
        pen = any(p.has_penalties for p in params)
        toks, lps = self.sampler(
            logits, params,
            [s.prompt_token_ids for s in rows] if pen else None,
            [s.output_token_ids for s in rows] if pen else None,
            [self._generator(s) for s in rows],
            [self._banned(s) for s in rows] if any(p.min_tokens for p in params) else None,
            batch.grammar_bitmask() if batch.grammar_bitmask is not None else None)
        it, lit = iter(toks), iter(lps or ())
        tokens = [next(it) if smp else None for smp in batch.sample]
        logprobs = [next(lit) if smp else None for smp in batch.sample] if lps is not None else None
        return tokens, logprobs, scored

    def _verify(self, batch: ScheduledBatch, logits) -> tuple[list, list | None]:
        """Speculative decoding: each sampled sequence's logits rows (one per draft and one more) -> per
        sequence None, or the tokens it emits (its accepted drafts, then the target's own), and their
        logprobs. Row j of a sequence samples as if its output already held the first j drafts."""
        params, prompts, outputs, gens, banned, drafts, spans = [], [], [], [], [], [], []
        for seq, smp, d in zip(batch.seqs, batch.sample, batch.spec):
            if not smp:
                spans.append(None)
                continue
            spans.append((len(drafts), len(d) + 1))
            out, g, p = seq.output_token_ids, self._generator(seq), seq.params
            for j in range(len(d) + 1):
                params.append(p)
                prompts.append(seq.prompt_token_ids)
                outputs.append(out + d[:j])
                gens.append(g)
                banned.append(self._banned(seq, j))
                drafts.append(d[j] if j < len(d) else -1)
        pen = any(p.has_penalties for p in params)
        grammar = batch.grammar_bitmask() if batch.grammar_bitmask is not None else None
        if grammar is not None:  # constrained sequences carry no drafts: sampled row r is its span's one row
            first = [a for a, _ in filter(None, spans)]
            grammar = ([first[r] for r in grammar[0]], grammar[1])
        emit, ok, lps = self.sampler.verify(logits, params, drafts, prompts if pen else None,
                                            outputs if pen else None, gens,
                                            banned if any(p.min_tokens for p in params) else None, grammar)
        tokens, logprobs = [], []
        for span in spans:
            if span is None:
                tokens.append(None)
                logprobs.append(None)
                continue
            a, k = span
            n = next((j + 1 for j in range(k) if not ok[a + j]), k)  # up to the first rejection
            tokens.append(emit[a:a + n])
            logprobs.append(lps[a:a + n] if lps is not None else None)
        return tokens, logprobs if lps is not None else None

    # ---------------------------------------------------------------- CUDA graphs
    def _capture(self):
        max_bs = self.max_num_seqs
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        pool = None
        for bs in reversed(graph_sizes(max_bs)):  # largest first: the smaller ones reuse its pool
            meta = StepMeta(slot_mapping=self.g_slots[:bs], block_table=self.g_tables[:bs],
                            seq_lens=self.g_seq_lens[:bs], cu_seqlens_q=self.g_cu[:bs + 1],
                            cu_seqlens_k=self.g_cu[:bs + 1], max_seqlen_q=1, max_seqlen_k=self.max_model_len,
                            decode=True)
            self.model.step(self.g_ids[:bs], self.g_pos[:bs], self.kv_caches, meta)  # warm-up (compiles kernels)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool):
                out = self.model.step(self.g_ids[:bs], self.g_pos[:bs], self.kv_caches, meta)
            pool = g.pool() if pool is None else pool
            self.graphs[bs] = (g, out)
        torch.cuda.synchronize()

    def _replay(self, ids, pos, slots, seq_lens, seqs):
        n = len(ids)
        bs = min(s for s in self.graphs if s >= n)
        pad = bs - n
        # padded rows: token 0 at position 0, no KV write (slot -1), attend to one (zeroed) slot
        self.g_ids[:bs].copy_(self._to(ids + [0] * pad, torch.long), non_blocking=True)
        self.g_pos[:bs].copy_(self._to(pos + [0] * pad, torch.long), non_blocking=True)
        self.g_slots[:bs].copy_(self._to(slots + [-1] * pad, torch.long), non_blocking=True)
        self.g_seq_lens[:bs].copy_(self._to(seq_lens + [1] * pad, torch.int32), non_blocking=True)
        w = self.max_blocks_per_seq
        self.g_tables[:n].copy_(self._to(table_rows(seqs, w, self.rows), torch.int32).view(n, w), non_blocking=True)
        if pad:
            self.g_tables[n:bs].zero_()
        g, out = self.graphs[bs]
        g.replay()
        return out
