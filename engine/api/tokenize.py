"""POST /tokenize and POST /detokenize, in vLLM's shapes: a client counts a prompt's tokens against
max_model_len, or reads ids back as text, with the server's own tokenizer and chat template."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ..chat_template import missing_template
from ..core.intake import check_token_ids
from ..core.request import RequestError
from .errors import GENERATE_ERRORS, engine_error
from .protocol import DetokenizeRequest, TokenizeRequest
from .serving import off_loop, state_of
from .tools import template_messages, tools_json

router = APIRouter()


def _encode(tokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:  # JSON's "\ud800" decodes to a lone surrogate, on which the tokenizer raises TypeError
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode: {e.reason}", param) from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


@router.post("/tokenize", responses=GENERATE_ERRORS)
async def tokenize(req: TokenizeRequest, request: Request):
    st = state_of(request)
    st.check_model(req.model, running=False)
    if req.prompt is not None:
        text, param, special = req.prompt, "prompt", req.add_special_tokens is not False
    else:
        if st.template is None:
            raise engine_error(missing_template("start the server with --chat-template FILE"), st.engine)
        text = await off_loop(st.template.render, template_messages(req), req.add_generation_prompt, tools_json(req))
        param, special = "messages", bool(req.add_special_tokens)
    ids = await off_loop(_encode, st.tokenizer, text, special, param)
    strs = [st.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": st.engine.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", responses=GENERATE_ERRORS)
async def detokenize(req: DetokenizeRequest, request: Request):
    st = state_of(request)
    st.check_model(req.model, running=False)
    if req.tokens:  # none decode to ""
        check_token_ids(req.tokens, st.engine.vocab_size, "tokens")
    text = await off_loop(lambda: st.tokenizer.decode(req.tokens, skip_special_tokens=False))
    return {"prompt": text}
