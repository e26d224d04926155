"""Continuous batching (no torch): sequences, waiting/running queues, chunked prefill.

Each step gets a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs).
Running sequences go first (decodes before prefill chunks, oldest first), then waiting ones
are admitted while blocks and budget last. A long prompt is computed over several steps;
only the step that reaches the end of a sequence's tokens samples a new token. When blocks
run out the newest running sequence is preempted by recompute: its blocks are freed and it
goes back to the front of the waiting queue (its generated tokens are kept and re-prefilled,
mostly from the prefix cache).

A sequence asking for prompt logprobs (params.prompt_logprobs) is scored: each step's batch names
the positions whose next-token logprobs the runner computes (ScheduledBatch.score), and until its
whole prompt is scored it takes no prefix-cache hits, so every prompt position is computed once
(a preemption resumes the scoring where it stopped).

When every layer is windowed (the block manager's window), a sequence holds only the blocks its
next queries can see: each step first releases the ones behind the window, a sequence is admitted
with blocks for its first chunk only, and a chunk shrinks to the free blocks before anyone is
preempted; so a sequence needs the window's blocks, not its length's.

A sequence may carry a gate (anything with done(): a structured-output request's grammar, compiling
on its own thread): while it is shut, a step that would reach the sequence's end computes its tokens
but the last, so it does not sample, and the other sequences go on; alone in a step, it samples, and
the step waits for the gate.

With LoRA (max_loras), the running sequences use at most max_loras distinct adapters: the runner holds
that many in its slots, and a waiting sequence whose adapter would be one more waits (others behind it
go ahead) until a running one's adapter is free again; its prefix-cache chain is its adapter's.
"""
from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .block_manager import BlockManager, lora_root


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _counter = itertools.count()  # arrival order only; never reset, carries no state

    def __init__(self, request_id: str, prompt_token_ids: list[int], params, lora=None, gate=None):
        self.request_id = request_id
        self.lora = lora                           # core.lora.LoRARequest or None (the base model)
        self.lora_id = lora.lora_int_id if lora is not None else 0
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)   # prompt + generated
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params                       # SamplingParams (duck-typed here: max_tokens)
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.parent_hash: bytes | None = None      # hash of the last hashed block: the next one's parent
        self.num_cached_tokens = 0                 # prefix-cache hit of the last admission
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.arrival = next(Sequence._counter)
        # prompt positions whose next-token logprobs are wanted: 0 .. num_prompt_tokens - 2
        self.score_end = self.num_prompt_tokens - 1 if getattr(params, "prompt_logprobs", None) is not None else 0
        self.num_scored = 0                        # of those, handed to the runner in past steps
        self.spec_token_ids: list[int] = []        # draft tokens for the next step (speculative decoding)
        self.gate = gate                           # None, or done() -> whether it may sample (see above)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self):
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


def _arrival(seq: Sequence) -> int:
    return seq.arrival


def _hold_gated(seqs, counts, sample, spec):
    """The batch less the sampling of the sequences whose gate is shut (their last token waits for a later
    step; its block is already held); when nothing else would run, they sample, and the step waits for them."""
    shut = []
    for i, seq in enumerate(seqs):
        if seq.gate is not None and seq.gate.done():
            seq.gate = None
        elif seq.gate is not None and sample[i]:
            shut.append(i)
    if not shut or len(shut) == len(seqs):
        return seqs, counts, sample, spec
    for i in shut:
        counts[i], sample[i] = counts[i] - 1, False
    keep = [i for i, n in enumerate(counts) if n]
    return [seqs[i] for i in keep], [counts[i] for i in keep], [sample[i] for i in keep], [spec[i] for i in keep]


class WaitQueue:
    """The waiting sequences in order, with O(1) removal from anywhere: a flood of clients that
    give up while queued must not cost a scan of the queue each."""

    def __init__(self):
        self._seqs: OrderedDict[int, Sequence] = OrderedDict()

    def append(self, seq: Sequence) -> None:
        self._seqs[id(seq)] = seq

    def appendleft(self, seq: Sequence) -> None:
        self._seqs[id(seq)] = seq
        self._seqs.move_to_end(id(seq), last=False)

    def popleft(self) -> Sequence:
        return self._seqs.popitem(last=False)[1]

    def remove(self, seq: Sequence) -> None:
        del self._seqs[id(seq)]

    def __getitem__(self, i: int) -> Sequence:
        if i != 0:
            raise IndexError("only the head of the queue is read")
        return next(iter(self._seqs.values()))

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self):
        return iter(self._seqs.values())


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]      # tokens computed this step, per sequence
    sample: list[bool]             # whether the step reaches the sequence's end (-> sample a token)
    finished_ids: list[str] = field(default_factory=list)  # requests ended since the last batch
    # per sequence, the positions [start, end) whose next-token logprobs to compute (prompt
    # logprobs), or None; the field is None when no sequence in the batch scores
    score: list[tuple[int, int] | None] | None = None
    # structured outputs (set by the engine after scheduling): None, or a call the runner makes once
    # it has issued the forward -> None | (indices among the sampled rows, int32 bitmask
    # (R, ceil(V / 32)) of the tokens each may draw)
    grammar_bitmask: Callable[[], tuple | None] | None = None
    # LoRA: the adapter ids of every running sequence (the runner evicts none of them); empty without LoRA
    running_loras: frozenset = frozenset()
    # speculative decoding: per sequence the draft tokens computed after its last token this step (its
    # num_new_tokens count them), or None when no sequence in the batch has any
    spec: list[list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        return not self.num_new_tokens or max(self.num_new_tokens) == 1  # every n >= 1

    def __len__(self):
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 1024, max_loras: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting = WaitQueue()
        self.running: list[Sequence] = []
        self.finished_ids: list[str] = []          # handed to the runner with the next batch
        self.num_preemptions = 0
        self.scoring: dict[str, Sequence] = {}     # sequences whose prompt is not all scored yet
        self.max_loras = max_loras
        self.lora_counts: dict[int, int] = {}      # adapter id -> running sequences using it

    # ---------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        """seq comes checked from the intake (core/intake.py): it fits the context and the pool."""
        self.waiting.append(seq)
        if seq.num_scored < seq.score_end:
            self.scoring[seq.request_id] = seq

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._lora_count(seq, -1)
        else:
            self.waiting.remove(seq)
        self.bm.free(seq.block_table)
        self.scoring.pop(seq.request_id, None)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.finished_ids.append(seq.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- scheduling
    def _lora_count(self, seq: Sequence, delta: int) -> None:
        if seq.lora_id:
            n = self.lora_counts.get(seq.lora_id, 0) + delta
            if n:
                self.lora_counts[seq.lora_id] = n
            else:
                del self.lora_counts[seq.lora_id]

    def _lora_waits(self, seq: Sequence) -> bool:
        """Whether seq's adapter would be one more than the slots hold beside the running ones'."""
        return (seq.lora_id != 0 and self.max_loras is not None and seq.lora_id not in self.lora_counts
                and len(self.lora_counts) >= self.max_loras)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._lora_count(seq, -1)
        self.bm.free(seq.block_table)
        seq.status, seq.num_computed_tokens, seq.num_hashed_blocks = Status.WAITING, 0, 0
        seq.parent_hash, seq.spec_token_ids = None, []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget, bs = self.max_num_batched_tokens, self.bm.block_size
        seqs, counts, sample, spec = [], [], [], []
        # running is kept in arrival order: decodes first so a long prefill chunk cannot stall
        # them, then prefill chunks, each oldest first (a stable partition, not a sort: this loop
        # is most of the host's work per step at hundreds of sequences)
        order = [s for s in self.running if len(s.token_ids) - s.num_computed_tokens <= 1]
        if len(order) < len(self.running):
            order += [s for s in self.running if len(s.token_ids) - s.num_computed_tokens > 1]
        preempted = False
        windowed = self.bm.window > 0
        if windowed:  # first, so every released block counts for every sequence's growth below
            for seq in self.running:
                seq.block_table = self.bm.slide(seq.block_table, seq.num_computed_tokens)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            done, total = seq.num_computed_tokens, len(seq.token_ids)
            n = total - done if total - done <= budget else budget
            drafts = seq.spec_token_ids
            if drafts:  # a decode step verifies its drafts too, as far as the budget goes
                seq.spec_token_ids = []
                drafts = drafts[:budget - 1] if n == total - done == 1 else []
                n += len(drafts)
            # most decode steps fit the last block: skip the block manager
            if done + n > len(seq.block_table) * bs:
                if windowed:  # a shorter chunk rather than a preemption: blocks free up as the window moves
                    n = max(1, min(n, (len(seq.block_table) + self.bm.num_free_blocks) * bs - done))
                while not self.bm.can_append(seq.block_table, done + n):
                    self._preempt(self._victim(seq, seqs))
                    preempted = True
                    if seq.status is not Status.RUNNING:
                        break
                if seq.status is not Status.RUNNING:
                    continue
                self.bm.append(seq.block_table, done + n)
                drafts = drafts[:n - 1]  # a windowed chunk may have shrunk
            seqs.append(seq)
            counts.append(n)
            sample.append(done + n >= total)
            spec.append(drafts)
            budget -= n
        # admit waiting sequences (not after a preemption: memory is short)
        held: list[Sequence] = []  # waiting for an adapter slot: they keep their places
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._lora_waits(seq):
                held.append(self.waiting.popleft())
                continue
            # room for all its tokens plus the next one, so its first decode step has a slot; windowed,
            # room for the window's band (what it holds while it decodes) and blocks for its first chunk
            if not self.bm.can_allocate(self.bm.held_tokens(seq.num_tokens + 1)):
                break
            self.waiting.popleft()
            seq.block_table, cached, seq.parent_hash = self.bm.admit(seq.token_ids, budget if windowed else None,
                                                                     seq.request_id not in self.scoring,
                                                                     lora_root(seq.lora_id))
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            seq.num_hashed_blocks = cached // self.bm.block_size
            seq.status = Status.RUNNING
            self._lora_count(seq, 1)
            bisect.insort(self.running, seq, key=_arrival)  # arrival order, whatever order waiting holds
            n = min(seq.num_tokens, len(seq.block_table) * bs) - cached
            n = n if n <= budget else budget
            seqs.append(seq)
            counts.append(n)
            sample.append(cached + n == seq.num_tokens)
            spec.append([])
            budget -= n
        for seq in reversed(held):
            self.waiting.appendleft(seq)
        if any(seq.gate is not None for seq in seqs):
            seqs, counts, sample, spec = _hold_gated(seqs, counts, sample, spec)
        finished, self.finished_ids = self.finished_ids, []
        return ScheduledBatch(seqs, counts, sample, finished, self._score(seqs, counts) if self.scoring else None,
                              running_loras=frozenset(self.lora_counts), spec=spec if any(spec) else None)

    def _score(self, seqs: list[Sequence], counts: list[int]) -> list[tuple[int, int] | None] | None:
        """The prompt positions each sequence scores this step: those it computes and has not scored."""
        out = []
        for seq, n in zip(seqs, counts):
            start = max(seq.num_computed_tokens, seq.num_scored)
            end = min(seq.num_computed_tokens + n, seq.score_end)
            out.append((start, end) if end > start else None)
        return out if any(out) else None

    def _victim(self, seq: Sequence, scheduled: list[Sequence]) -> Sequence:
        """The newest running sequence not yet scheduled this step (else seq itself) to preempt."""
        taken = set(map(id, scheduled))
        return next((s for s in reversed(self.running) if s is not seq and id(s) not in taken), seq)

    def postprocess(self, batch: ScheduledBatch, sampled: list) -> list[int]:
        """Advance each scheduled sequence and append its sampled token (None: none; with drafts, a list:
        the accepted drafts and one more). Returns the batch indices that got tokens; whether they are
        done is request.check_stop's call."""
        out = []
        bm = self.bm
        hashing = bm.enable_prefix_caching
        score = batch.score
        for i, (seq, n, tok) in enumerate(zip(batch.seqs, batch.num_new_tokens, sampled)):
            if seq.status is not Status.RUNNING:  # aborted while the step ran
                continue
            if score is not None and score[i] is not None:
                seq.num_scored = score[i][1]
                if seq.num_scored >= seq.score_end:
                    del self.scoring[seq.request_id]
            if isinstance(tok, list):  # verified drafts: only the accepted ones' KV counts
                seq.token_ids.extend(tok)
                seq.num_computed_tokens += n - (len(batch.spec[i]) - (len(tok) - 1))
                need = -(-len(seq.token_ids) // bm.block_size)
                if len(seq.block_table) > need:  # the rejected drafts' blocks (a new list: see table_rows)
                    bm.free(seq.block_table[need:])
                    seq.block_table = seq.block_table[:need]
                tok = None
                out.append(i)
            else:
                seq.num_computed_tokens += n
            if hashing and seq.num_computed_tokens // bm.block_size > seq.num_hashed_blocks:  # a block filled up
                seq.num_hashed_blocks, seq.parent_hash = bm.commit(seq.block_table, seq.token_ids,
                                                                   seq.num_computed_tokens, seq.num_hashed_blocks,
                                                                   seq.parent_hash)
            if tok is not None:
                seq.token_ids.append(tok)
                out.append(i)
        return out
