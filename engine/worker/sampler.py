"""The batched sampler (its per-request settings: core/sampling_params.py).

The sampler works on the whole batch's logits (B, V) at once; per-row settings become (B,)
tensors. Order: penalties -> logit_bias -> min_tokens ban -> greedy rows take argmax ->
temperature -> top-k -> top-p -> min-p -> draw; structured outputs' grammar mask comes after the
bans, before greedy/temperature. Draws use the exponential-race trick
argmax(p / E), E ~ Exp(1), so a seeded request draws its own E from its own torch.Generator:
its samples do not depend on the rest of the batch. The min_tokens ban (the stop ids of the
rows the runner names) comes after logit_bias, so no bias brings a stop token back; rows with
neither pay nothing.

Logprobs are the model's raw distribution, log_softmax(logits) before penalties and
temperature (vLLM's "raw_logprobs"), so they mean the same whatever the sampling settings.
"""
from __future__ import annotations

import torch

from gpt_engine.kernels import apply_token_bitmask_


_FMAX = torch.finfo(torch.float32).max
_PEN_RANGE = (1e-30, 1e30)


def _rows(lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> (row index, token id) flat tensors for scatter."""
    rows = [i for i, l in enumerate(lists) for _ in l]
    cols = [t for l in lists for t in l]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)


def apply_penalties(logits, params, prompt_ids, output_ids):
    """logits (B, V) fp32 in place. repetition (HF): over prompt+output tokens, positive
    logits / p, negative * p. presence/frequency (OpenAI): over output tokens,
    logit -= frequency * count + presence * (count > 0)."""
    B, V = logits.shape
    dev = logits.device
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        r, c = _rows([(pi + oi) if p.repetition_penalty != 1.0 else []
                      for p, pi, oi in zip(params, prompt_ids, output_ids)], dev)
        seen[r, c] = True
        # 1e-300 and 1e300 are 0 and inf in fp32 (x / 0, 0 * inf: NaN). Within _PEN_RANGE a
        # penalty keeps the order of any real logit; the clamp keeps the rest finite.
        pen = torch.tensor(rep, dtype=logits.dtype, device=dev).clamp(*_PEN_RANGE)[:, None]
        pen_logits = torch.where(logits > 0, logits / pen, logits * pen).clamp(-_FMAX, _FMAX)
        logits.copy_(torch.where(seen, pen_logits, logits))
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        counts = torch.zeros(B, V, dtype=logits.dtype, device=dev)
        r, c = _rows([oi if (p.presence_penalty or p.frequency_penalty) else []
                      for p, oi in zip(params, output_ids)], dev)
        counts.index_put_((r, c), torch.ones_like(r, dtype=logits.dtype), accumulate=True)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        logits -= freq * counts + pres * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits, params):
    """logits (B, V) fp32 in place: each row's {token_id: bias} added, in one scatter for the batch."""
    rows = [i for i, p in enumerate(params) for _ in p.logit_bias or ()]
    cols = [t for p in params for t in p.logit_bias or ()]
    vals = [b for p in params for b in (p.logit_bias or {}).values()]
    dev = logits.device
    idx = (torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(cols, dtype=torch.long, device=dev))
    logits.index_put_(idx, torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return logits


def apply_ban(logits, banned: list[list[int]]):
    """logits (B, V) in place: row i's banned ids -> -inf (min_tokens' stop ids)."""
    r, c = _rows(banned, logits.device)
    logits[r, c] = float("-inf")
    return logits


def apply_grammar_bitmask(logits, rows: list[int], bitmask):
    """logits (B, V) fp32 in place: rows[i]'s tokens whose bit is 0 in bitmask[i] (numpy int32 words,
    token t at bit t % 32 of word t // 32) -> -inf; ids past the mask's words too."""
    dev = logits.device
    return apply_token_bitmask_(logits, torch.tensor(rows, device=dev),
                                torch.from_numpy(bitmask).to(dev, non_blocking=True))


def apply_top_k_top_p(logits, top_k: torch.Tensor | None, top_p: torch.Tensor | None):
    """logits (B, V); top_k (B,) long (V = off); top_p (B,) float (1 = off). Masked -> -inf."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        mask |= torch.arange(V, device=logits.device)[None, :] >= top_k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first one always stays)
        mask |= (probs.cumsum(-1) - probs) >= top_p[:, None]
        mask[:, 0] = False  # ... even if top_p is 0 in fp32 (1e-300): then it is greedy
    return logits.scatter(-1, idx, sorted_logits.masked_fill(mask, float("-inf")))


def apply_min_p(logits, min_p: torch.Tensor):
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))


class Sampler:
    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}  # per-device stream for unseeded rows

    def _generator(self, device) -> torch.Generator:
        g = self.generators.get(device)
        if g is None:
            g = torch.Generator(device)
            g.manual_seed(self.seed) if self.seed is not None else g.seed()
            self.generators[device] = g
        return g

    @staticmethod
    def request_generator(seed: int, device) -> torch.Generator:
        g = torch.Generator(device)
        g.manual_seed(seed)
        return g

    def _noise(self, like: torch.Tensor, generators, uniform: bool = False) -> torch.Tensor:
        """Exp(1) (or U[0, 1)) noise shaped like `like`; a seeded request's rows from its own generator.
        Exp(1) is -log(U): torch's CPU exponential_ costs several times a uniform draw and its log. U = 0
        gives inf, a row the race never picks, and U < 1 keeps every draw above 0 (no p / 0)."""
        q = torch.empty_like(like)
        seeded = [(i, g) for i, g in enumerate(generators or ()) if g is not None]
        if len(seeded) < q.shape[0]:  # rows of no seed: the engine's stream
            q.uniform_(generator=self._generator(like.device))
        for i, g in seeded:  # a seeded request: its own stream, whatever else is in the batch
            q[i].uniform_(generator=g)
        return q if uniform else q.log_().neg_()

    @staticmethod
    def _masked(logits, params, prompt_ids, output_ids, banned, grammar_bitmask):
        """-> (logits fp32 after penalties, logit_bias, bans and the grammar mask, written in place; the raw
        log-softmax where logprobs are asked, else None). The step's logits are the sampler's to write:
        the runner's are new each step, or a CUDA graph's output that its next replay rewrites; a view
        that cannot be written (an expanded row) is copied first."""
        logits = logits.float()
        if not logits.is_contiguous():
            logits = logits.contiguous()
        raw_lp = logits.log_softmax(-1) if any(p.logprobs is not None for p in params) else None
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, params, prompt_ids, output_ids)
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits, params)
        if banned is not None and any(banned):
            logits = apply_ban(logits, banned)
        if grammar_bitmask is not None:
            logits = apply_grammar_bitmask(logits, *grammar_bitmask)
        return logits, raw_lp

    @staticmethod
    def _probs(logits, params, greedy) -> torch.Tensor:
        """(B, V) the distribution each sampled row draws from: temperature, top-k, top-p, min-p."""
        B, V = logits.shape
        dev = logits.device
        temp = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=dev)
        # scores stay finite, or softmax's inf - inf is NaN: a big penalized logit over a small
        # temperature overflows, and a huge temperature (1e300 is inf in fp32) makes -inf / inf
        x = (logits / temp.clamp_max(_FMAX)[:, None]).clamp(-_FMAX, _FMAX)
        use_k = any(p.top_k > 0 for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        if use_k or use_p:
            top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=dev) if use_k else None
            top_p = torch.tensor([p.top_p for p in params], device=dev) if use_p else None
            x = apply_top_k_top_p(x, top_k, top_p)
        if any(p.min_p > 0 for p in params):
            x = apply_min_p(x, torch.tensor([p.min_p for p in params], device=dev))
        return x.softmax(-1)

    @torch.no_grad()
    def __call__(self, logits, params, prompt_ids=None, output_ids=None, generators=None, banned=None,
                 grammar_bitmask=None):
        """logits (B, V); params/prompt_ids/output_ids/generators: one per row (generator None
        for unseeded rows); banned: None, or per row the ids it may not draw now (min_tokens);
        grammar_bitmask: None, or (row indices, int32 bitmask (R, ceil(V / 32))) of structured outputs.
        Returns (tokens list[int], logprobs list[dict|None] or None)."""
        logits, raw_lp = self._masked(logits, params, prompt_ids, output_ids, banned, grammar_bitmask)
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = _argmax(logits)
        else:
            probs = self._probs(logits, params, greedy)
            tokens = _argmax(probs / self._noise(probs, generators))
            if any(greedy):
                tokens = torch.where(torch.tensor(greedy, device=logits.device), _argmax(logits), tokens)
        tok_list = tokens.tolist()
        if raw_lp is None:
            return tok_list, None
        return tok_list, _logprobs(raw_lp, tokens, params)

    @torch.no_grad()
    def verify(self, logits, params, drafts: list[int], prompt_ids=None, output_ids=None, generators=None,
               banned=None, grammar_bitmask=None):
        """Speculative decoding's rejection sampling (core/spec_decode.py). Row i is one position of a
        sequence's verification, with its own params, output so far (the drafts before it) and bans;
        drafts[i] is the draft token that row tests, or -1 for a row that only draws. A draft is
        accepted with the probability the row's distribution gives it (greedy: when it is the argmax);
        otherwise the row draws from its distribution with the draft taken out. -> (per row the token
        it emits (the draft where accepted), per row whether the draft was accepted, logprobs as
        __call__'s)."""
        logits, raw_lp = self._masked(logits, params, prompt_ids, output_ids, banned, grammar_bitmask)
        dev = logits.device
        d = torch.tensor(drafts, dtype=torch.long, device=dev)
        has = d >= 0
        dd = d.clamp(min=0)[:, None]
        greedy = [p.greedy for p in params]
        target = _argmax(logits)
        accept = has & (target == d)
        emit = target
        if not all(greedy):
            probs = self._probs(logits, params, greedy)
            p_d = probs.gather(-1, dd)[:, 0]
            u = self._noise(p_d, generators, uniform=True)
            residual = probs.scatter(-1, dd, torch.where(has, 0.0, p_d)[:, None])
            drawn = _argmax(residual / self._noise(residual, generators))
            g = torch.tensor(greedy, device=dev)
            accept = torch.where(g, accept, has & (u < p_d))
            emit = torch.where(g, target, drawn)
        emit = torch.where(accept, d, emit)
        lps = _logprobs(raw_lp, emit, params) if raw_lp is not None else None
        return emit.tolist(), accept.tolist(), lps


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x (B, V) -> (B,) int64, the first maximum per row. On CPU through numpy, whose argmax over
    the last dim is several times faster than torch's; both take the first of equal maxima and
    treat NaN as the maximum."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.contiguous().numpy().argmax(-1))
    return x.argmax(-1)


def _logprobs(raw_lp, tokens, params):
    """Per row: {token_id: logprob} holding the chosen token and the top-N alternatives."""
    n = max(p.logprobs or 0 for p in params)
    chosen = raw_lp.gather(-1, tokens[:, None])[:, 0].tolist()
    top_v, top_i = raw_lp.topk(n, dim=-1) if n else (None, None)
    top_v = top_v.tolist() if n else None
    top_i = top_i.tolist() if n else None
    out = []
    for b, (p, t) in enumerate(zip(params, tokens.tolist())):
        if p.logprobs is None:
            out.append(None)
            continue
        d = {t: chosen[b]}
        for j in range(p.logprobs):
            d.setdefault(top_i[b][j], top_v[b][j])
        out.append(d)
    return out
