"""POST /v1/chat/completions: the conversation rendered by the model's chat template, then a
completion of that text."""
from __future__ import annotations

import functools
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..chat_template import missing_template
from .errors import GENERATE_ERRORS, engine_error
from .protocol import ChatCompletionRequest
from .serving import (begin, collect, make_choices, merge, norm_logprobs, prompt_logprobs_json, record,
                      sse_stream, usage)
from .tool_parsers import ToolStreamer
from .tools import forced_constraint, parser_for, template_messages, tools_json

router = APIRouter()


@router.post("/v1/chat/completions", responses=GENERATE_ERRORS)
async def chat_completions(req: ChatCompletionRequest, request: Request):
    t0, st, model = begin(request, req)
    if st.template is None:
        raise engine_error(missing_template("start the server with --chat-template FILE"), st.engine)
    parser = parser_for(st, req)
    max_calls = 1 if req.parallel_tool_calls is False else None
    messages = template_messages(req)
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    forced = forced_constraint(req)
    # the constraint compiles on the grammar thread while the template renders and the prompt tokenizes
    st.engine.compile_ahead({**req.sampling_fields(), **(forced or {})}.get("structured_outputs"))
    # tool_choice "none" still shows the tools to the model, as vLLM does by default; rendered on the worker
    # thread that tokenizes it, and it carries its own BOS
    render = functools.partial(st.template.render, messages, req.add_generation_prompt, tools_json(req))
    rid, choices = await make_choices(st, req, [render], "chatcmpl", top_n, sampling=forced,
                                      add_special_tokens=False, param="messages")

    def logprobs_of(entries) -> dict | None:
        if top_n is None:
            return None

        def item(i, lp):
            s = st.token_str(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top[:top_n]]}
                            for t, lp, top in entries]}

    if req.stream:
        streamers = {c.index: ToolStreamer(parser) for c in choices} if parser else {}

        def deltas(c, out) -> list[dict]:
            """The delta(s) of one engine output: its text, or with tools its settled content and then
            each newly closed call, as OpenAI streams one: id, type and name once, then the arguments."""
            if not parser:
                return [{"content": out.new_text} if out.new_text else {}]
            s = streamers[c.index]
            content, calls = s.feed(out.new_text, out.finished)
            first = s.calls - len(calls)
            ds = [{"content": content}] if content else []
            for k, call in enumerate(calls, first):
                if max_calls is not None and k >= max_calls:
                    break
                ds.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
                ds.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
            return ds or [{}]

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
                ds = deltas(c, out)
                finish = finish_reason(c, bool(parser) and streamers[c.index].calls > 0)
                for k, delta in enumerate(ds):
                    extra = {} if k or req.prompt_logprobs is None or out.prompt_logprobs is None or c.index else \
                        {"prompt_logprobs": prompt_logprobs_json(st, out)}
                    yield {**base, "created": int(time.time()), **extra, "choices": [
                        {"index": c.index, "delta": delta,
                         "logprobs": None if k else logprobs_of(norm_logprobs(out.new_token_ids, out.new_logprobs)),
                         "finish_reason": finish if k == len(ds) - 1 else None}]}
        return StreamingResponse(sse_stream(st, chunks(), choices, rid, "chat.completion.chunk", req.include_usage,
                                            model=model),
                                 media_type="text/event-stream")

    await collect(st, request, choices, t0)

    def answer(c) -> dict:
        if not parser:
            return {"message": {"role": "assistant", "content": c.final.text}, "finish_reason": c.finish_reason}
        p = parser.parse(c.final.text)
        msg = {"role": "assistant", "content": p.content if p.content.strip() else None}
        if p.calls:
            msg["tool_calls"] = [call.json() for call in p.calls[:max_calls]]
        return {"message": msg, "finish_reason": finish_reason(c, bool(p.calls))}

    # vLLM's prompt_logprobs (the rendered conversation's), when asked for
    extra = {} if req.prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs_json(st, choices[0].final)}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, **answer(c),
                         "logprobs": logprobs_of(norm_logprobs(c.final.token_ids, c.final.logprobs))}
                        for c in choices],
            "usage": usage(choices), **extra}


def finish_reason(c, called: bool) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended by itself in calls; "length" stays."""
    return "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
