"""POST /v1/completions."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .errors import GENERATE_ERRORS
from .protocol import CompletionRequest
from .serving import (Choice, begin, collect, make_choices, merge, norm_logprobs, prompt_text, record, sse_stream,
                      usage)

DEFAULT_MAX_TOKENS = 16   # OpenAI's legacy completions default

router = APIRouter()


@router.post("/v1/completions", responses=GENERATE_ERRORS)
async def completions(req: CompletionRequest, request: Request):
    t0, st = begin(request, req)
    model = st.model_name
    rid, choices = await make_choices(st, req, req.prompt, "cmpl", req.logprobs, DEFAULT_MAX_TOKENS)
    want_lp = req.logprobs is not None
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
                "top_logprobs": [{st.token_str(i): v for i, v in top[:req.logprobs]} for _, _, top in entries],
                "text_offset": text_offset}

    if req.stream:
        async def chunks():
            echoed = set()
            async for c, out in merge(st, choices, t0):
                record(c, out)
                text = out.new_text or ""
                if req.echo and c.index not in echoed:
                    echoed.add(c.index)
                    text = prompt_text(st, c) + text
                if not text and not out.finished and not out.new_token_ids:
                    continue
                yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                       "choices": [{"index": c.index, "text": text,
                                    "logprobs": logprobs_of(c, norm_logprobs(out.new_token_ids, out.new_logprobs)),
                                    "finish_reason": c.finish_reason}]}
        return StreamingResponse(sse_stream(st, chunks(), choices, rid, "text_completion", req.include_usage),
                                 media_type="text/event-stream")

    await collect(st, request, choices, t0)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": (prompt_text(st, c) if req.echo else "") + c.final.text,
                         "logprobs": logprobs_of(c, norm_logprobs(c.final.token_ids, c.final.logprobs)),
                         "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": usage(choices)}
