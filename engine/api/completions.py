"""POST /v1/completions.

echo with logprobs scores the prompt (lm-evaluation-harness' loglikelihood requests): the engine
computes the prompt's logprobs (SamplingParams.prompt_logprobs) and the choice's logprobs cover the
prompt, then the completion, the prompt's first token with null (nothing precedes it), as OpenAI's
legacy API and vLLM answer. echo with max_tokens 0 generates one token, as vLLM does, and returns
only the prompt."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .errors import GENERATE_ERRORS
from .protocol import CompletionRequest
from .serving import (Choice, begin, collect, make_choices, merge, norm_logprobs, prompt_logprobs_json,
                      prompt_text, record, sse_stream, usage)

DEFAULT_MAX_TOKENS = 16   # OpenAI's legacy completions default

router = APIRouter()


@router.post("/v1/completions", responses=GENERATE_ERRORS)
async def completions(req: CompletionRequest, request: Request):
    t0, st, model = begin(request, req)
    echo_only = req.echo and req.max_tokens == 0
    sampling = {"max_tokens": 1} if echo_only else {}
    want_lp = req.logprobs is not None
    scored = req.echo and want_lp
    if scored and req.prompt_logprobs is None:  # vLLM's rule: echo's prompt logprobs are logprobs' top-N
        sampling["prompt_logprobs"] = req.logprobs
    rid, choices = await make_choices(st, req, req.prompt, "cmpl", req.logprobs, DEFAULT_MAX_TOKENS,
                                      sampling=sampling)
    offsets = {c.index: 0 for c in choices}

    def logprobs_of(c: Choice, entries) -> dict | None:
        if not want_lp:
            return None
        toks = [st.token_str(t) for t, _, _ in entries]
        text_offset = []
        for s in toks:
            text_offset.append(offsets[c.index])
            offsets[c.index] += len(s)
        return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {st.token_str(i): v for i, v in top[:req.logprobs]}
                                 for _, _, top in entries],
                "text_offset": text_offset}

    def prompt_entries(c: Choice, out) -> list:
        """The prompt's (token, logprob, top) entries, the first (None, None), when echo scores it."""
        if not scored:
            return []
        ids = c.prompt_ids
        return [(ids[0], None, None)] + norm_logprobs(ids[1:], out.prompt_logprobs[1:])

    def extra(out) -> dict:
        # vLLM's response field, when the request asked for it by name
        return {} if req.prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs_json(st, out)}

    if req.stream:
        async def chunks():
            echoed = set()
            async for c, out in merge(st, choices, t0):
                record(c, out)
                text, ids, lps = out.new_text or "", out.new_token_ids, out.new_logprobs
                if echo_only:
                    text, ids, lps = "", [], []
                first = c.index not in echoed
                head = []
                if req.echo and first:
                    echoed.add(c.index)
                    text = prompt_text(st, c) + text
                    head = prompt_entries(c, out)
                if not text and not out.finished and not ids and not head:
                    continue
                yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                       "choices": [{"index": c.index, "text": text,
                                    "logprobs": logprobs_of(c, head + norm_logprobs(ids, lps)),
                                    "finish_reason": c.finish_reason,
                                    **(extra(out) if out.prompt_logprobs is not None and first else {})}]}
        return StreamingResponse(sse_stream(st, chunks(), choices, rid, "text_completion", req.include_usage,
                                            generated=not echo_only, model=model),
                                 media_type="text/event-stream")

    await collect(st, request, choices, t0)
    body = []
    for c in choices:
        out = c.final
        gen = [] if echo_only else norm_logprobs(out.token_ids, out.logprobs)
        body.append({"index": c.index,
                     "text": (prompt_text(st, c) if req.echo else "") + ("" if echo_only else out.text),
                     "logprobs": logprobs_of(c, prompt_entries(c, out) + gen),
                     "finish_reason": c.finish_reason, **extra(out)})
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": body, "usage": usage(choices, generated=not echo_only)}
