"""POST /v1/completions."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .errors import GENERATE_ERRORS
from .protocol import CompletionRequest
from .serving import Choice, begin, collect, make_choices, merge, off_loop, prompt_of, record, sse_stream, usage

router = APIRouter()


@router.post("/v1/completions", responses=GENERATE_ERRORS)
async def completions(req: CompletionRequest, request: Request):
    t0, st = begin(request, req)
    model = st.engine.model_name
    prompts = await off_loop(lambda: [prompt_of(st, p) for p in req.prompt])
    rid, choices = make_choices(st, req, prompts, "cmpl", 16, req.logprobs)
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
                n_before = len(c.logprobs)
                record(c, out, want_lp)
                text = out.new_text or ""
                if req.echo and c.index not in echoed:
                    echoed.add(c.index)
                    text = c.prompt_text + text
                if not text and not out.finished and not out.new_token_ids:
                    continue
                yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                       "choices": [{"index": c.index, "text": text, "logprobs": logprobs_of(c, c.logprobs[n_before:]),
                                    "finish_reason": c.finish_reason}]}
        return StreamingResponse(sse_stream(st, chunks(), choices, rid, "text_completion", req.include_usage),
                                 media_type="text/event-stream")

    await collect(st, request, choices, want_lp, t0)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": (c.prompt_text if req.echo else "") + c.text,
                         "logprobs": logprobs_of(c, c.logprobs), "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": usage(choices)}
