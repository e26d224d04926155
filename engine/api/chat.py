"""POST /v1/chat/completions: the conversation rendered by the model's chat template, then a
completion of that text."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..chat_template import missing_template
from .errors import GENERATE_ERRORS, engine_error
from .protocol import ChatCompletionRequest
from .serving import (begin, collect, make_choices, merge, norm_logprobs, off_loop, prompt_logprobs_json, record,
                      sse_stream, usage)

router = APIRouter()


@router.post("/v1/chat/completions", responses=GENERATE_ERRORS)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    t0, st = begin(request, req)
    model = st.model_name
    if st.template is None:
        raise engine_error(missing_template("start the server with --chat-template FILE"), st.engine)
    messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    text = await off_loop(st.template.render, messages, req.add_generation_prompt)
    # the rendered template carries its own BOS
    rid, choices = await make_choices(st, req, [text], "chatcmpl", top_n, add_special_tokens=False, param="messages")

    def logprobs_of(entries) -> dict | None:
        if top_n is None:
            return None

        def item(i, lp):
            s = st.token_str(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top[:top_n]]}
                            for t, lp, top in entries]}

    if req.stream:
        async def chunks():
            base = {"id": rid, "object": "chat.completion.chunk", "model": model}
            for c in choices:  # the role first, as OpenAI does
                yield {**base, "created": int(time.time()), "choices": [
                    {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]}
            async for c, out in merge(st, choices, t0):
                record(c, out)
                if not out.new_text and not out.finished and not out.new_token_ids:
                    continue
                delta = {"content": out.new_text} if out.new_text else {}
                extra = {} if req.prompt_logprobs is None or out.prompt_logprobs is None or c.index else \
                    {"prompt_logprobs": prompt_logprobs_json(st, out)}
                yield {**base, "created": int(time.time()), **extra, "choices": [
                    {"index": c.index, "delta": delta,
                     "logprobs": logprobs_of(norm_logprobs(out.new_token_ids, out.new_logprobs)),
                     "finish_reason": c.finish_reason}]}
        return StreamingResponse(sse_stream(st, chunks(), choices, rid, "chat.completion.chunk", req.include_usage),
                                 media_type="text/event-stream")

    await collect(st, request, choices, t0)
    # vLLM's prompt_logprobs (the rendered conversation's), when asked for
    extra = {} if req.prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs_json(st, choices[0].final)}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.final.text},
                         "logprobs": logprobs_of(norm_logprobs(c.final.token_ids, c.final.logprobs)),
                         "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": usage(choices), **extra}
