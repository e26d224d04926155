"""Speculative decoding's draft model (core/spec_decode.py): a small model with the target's tokenizer
proposes each decoding sequence's next k tokens, greedily. Its paged KV pool has the target's block
count and is indexed by the target's block tables (one block manager for both), so a sequence's
draft KV lives in the same slots as its target KV; the engine allocates the slots of the drafts
before asking. Per sequence it remembers how far its KV goes; after a verification only the
accepted tokens' part is kept, and the rest is computed again (a catch-up chunk, as a prefill)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..core.scheduler import ScheduledBatch
from .model_runner import ModelRunner


class DraftModel:
    def __init__(self, path: str, cfg, target: ModelRunner, tokenizer, device: torch.device):
        from ..llm import build_model
        if not Path(path).is_dir():
            raise ValueError(f"speculative_config: draft model {path!r} is not a directory")
        model, tok, _, _, _ = build_model(path, cfg, device)
        if tokenizer is not None and (tok is None or tok.vocab() != tokenizer.vocab()):
            raise ValueError(f"speculative_config: draft model {path!r} does not have the target model's tokenizer")
        if tokenizer is None and model.config.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config: draft model {path!r} has a vocabulary of "
                             f"{model.config.vocab_size}, the target {target.vocab_size}")
        # a draft never names a token the other model lacks (a padded vocabulary's extra rows)
        self.vocab = min(model.config.vocab_size, target.vocab_size)
        self.runner = ModelRunner(model, target.block_size, target.max_num_seqs, target.max_num_batched_tokens,
                                  target.max_model_len, num_kv_blocks=target.num_blocks, enforce_eager=True)
        self.budget = target.max_num_batched_tokens
        self.computed: dict[str, tuple[list, int]] = {}  # request id -> (the block table it holds KV in, tokens)

    def release(self, request_ids) -> None:
        for rid in request_ids:
            self.computed.pop(rid, None)
        self.runner.release(request_ids)

    @torch.no_grad()
    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        """seqs: decoding sequences (their newest token not yet computed) whose block tables have slots
        for k more tokens; ks: how many drafts each wants (>= 1) -> the drafts."""
        views = []
        for seq in seqs:
            table, n = self.computed.get(seq.request_id, (None, 0))
            n = min(n, seq.num_computed_tokens) if table is seq.block_table else 0  # a new table: from 0
            views.append(SimpleNamespace(request_id=seq.request_id, token_ids=list(seq.token_ids),
                                         num_computed_tokens=n, block_table=seq.block_table,
                                         num_prompt_tokens=seq.num_prompt_tokens))
        drafts: list[list[int]] = [[] for _ in seqs]
        # catch-up: every token the draft has not seen, in chunks of the step budget; each sequence's
        # first draft comes from its last chunk
        pending = list(range(len(seqs)))
        while pending:
            budget, batch, counts, sample = self.budget, [], [], []
            for i in pending:
                v = views[i]
                n = min(len(v.token_ids) - v.num_computed_tokens, budget)
                if n == 0:
                    break
                batch.append(i)
                counts.append(n)
                sample.append(v.num_computed_tokens + n == len(v.token_ids))
                budget -= n
            self._step(views, batch, counts, sample, drafts)
            pending = [i for i in pending if not drafts[i]]
        # then one decode step per further draft, for the sequences that want more
        for j in range(1, max(ks)):
            batch = [i for i in range(len(seqs)) if ks[i] > j]
            self._step(views, batch, [1] * len(batch), [True] * len(batch), drafts)
        for seq, v in zip(seqs, views):
            self.computed[seq.request_id] = (seq.block_table, v.num_computed_tokens)
        return [d[:k] for d, k in zip(drafts, ks)]

    def _step(self, views, batch: list[int], counts: list[int], sample: list[bool], drafts) -> None:
        """One draft forward over views[batch] (counts new tokens each); a sampled one's greedy token is
        its next draft, appended to its view."""
        step = ScheduledBatch([views[i] for i in batch], counts, sample)
        logits, _ = self.runner.execute(step)
        tokens = logits[:, :self.vocab].argmax(-1).tolist()
        it = iter(tokens)
        for i, n, smp in zip(batch, counts, sample):
            v = views[i]
            v.num_computed_tokens += n
            if smp:
                t = next(it)
                drafts[i].append(t)
                v.token_ids.append(t)
