"""Prompt logprobs: the next-token logprobs of the prompt positions a step computes.

The scheduler names the positions (ScheduledBatch.score); the runner keeps the step's hidden states
and hands them here. The head and log_softmax run over a bounded number of rows at a time, so a long
prompt never holds (its length, vocab) fp32 logits at once. As the sampler's logprobs, they are the
model's raw distribution.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24   # logits held at once per chunk: rows = this // vocab


def score_rows(batch, cu_q: list[int]) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    """-> (hidden row per scored position, its target token (the next prompt token), its top-N,
    and per sequence the (first, end) of its scored rows in those lists, (0, 0) when none)."""
    rows, targets, tops, spans = [], [], [], []
    for i, (seq, rng) in enumerate(zip(batch.seqs, batch.score)):
        if rng is None:
            spans.append((0, 0))
            continue
        start, end = rng
        first = cu_q[i] - seq.num_computed_tokens   # row of position p: first + p
        spans.append((len(rows), len(rows) + end - start))
        rows.extend(range(first + start, first + end))
        targets.extend(seq.token_ids[start + 1:end + 1])
        tops.extend([seq.params.prompt_logprobs] * (end - start))
    return rows, targets, tops, spans


@torch.no_grad()
def prompt_logprobs(logits_fn, h: torch.Tensor, rows: list[int], targets: list[int], tops: list[int],
                    vocab_size: int) -> list[dict[int, float]]:
    """h (N, C) the step's hidden states; per scored row its {target: logprob} plus the top-N, in order."""
    out: list[dict[int, float]] = []
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    dev = h.device
    for a in range(0, len(rows), step):
        idx = torch.tensor(rows[a:a + step], dtype=torch.long, device=dev)
        tgt = torch.tensor(targets[a:a + step], dtype=torch.long, device=dev)
        lp = logits_fn(h[idx]).float().log_softmax(-1)          # (rows, V)
        chosen = lp.gather(-1, tgt[:, None])[:, 0].tolist()
        k = max(tops[a:a + step])
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None
        for j, (t, lpt) in enumerate(zip(targets[a:a + step], chosen)):
            d = {t: lpt}
            for m in range(tops[a + j]):
                d.setdefault(top_i[j][m], top_v[j][m])
            out.append(d)
    return out
