"""POST /tokenize and POST /detokenize (vLLM's extension endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..prompts import check_token_ids, encode_text, render_chat
from ..protocol import DetokenizeRequest, TokenizeRequest
from ..responses import DetokenizeResponse, TokenizeResponse
from ..state import ServerState, get_state
from .common import error_responses

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 413, 503))
async def tokenize(body: TokenizeRequest, state: ServerState = Depends(get_state)) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template."""
    state.check_ready()
    state.check_model(body.model)
    tokenizer = state.engine.tokenizer
    if body.messages is not None:
        text = render_chat(
            tokenizer,
            body.messages,
            chat_template=state.settings.chat_template,
            add_generation_prompt=body.add_generation_prompt,
        )
        ids = encode_text(tokenizer, text, add_special_tokens=False)  # the template holds BOS
    else:
        ids = encode_text(tokenizer, body.prompt or "", add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=state.engine.model_info.max_model_len,
        tokens=ids,
        token_strs=list(tokenizer.convert_ids_to_tokens(ids)),
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 413, 503))
async def detokenize(body: DetokenizeRequest, state: ServerState = Depends(get_state)) -> DetokenizeResponse:
    """The text of a list of token ids."""
    state.check_ready()
    state.check_model(body.model)
    tokenizer = state.engine.tokenizer
    ids = check_token_ids(tokenizer, body.tokens, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(ids))
