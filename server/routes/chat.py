"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from ..generation import ChoiceState
from ..logprobs import chat_logprobs
from ..prompts import chat_prompt_ids, check_context
from ..protocol import ChatCompletionRequest
from ..responses import ChatChoice, ChatCompletionResponse, ChatMessageOut
from ..sampling import build_sampling_params
from ..state import ServerState, get_state
from ..streaming import ChatChunkFormatter
from .common import STREAM_RESPONSE, collect, error_responses, max_model_len, start_group, stream

router = APIRouter(tags=["openai"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**STREAM_RESPONSE, **error_responses()},
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> ChatCompletionResponse | Response:
    """Chat completion over the model's chat template; streamed as SSE when ``stream`` is true."""
    state.check_ready()
    model = state.check_model(body.model)
    prompt_ids = chat_prompt_ids(
        state.engine.tokenizer,
        body.messages,
        chat_template=state.settings.chat_template,
        add_generation_prompt=body.add_generation_prompt,
    )
    max_tokens = check_context(len(prompt_ids), body.max_new_tokens, max_model_len(state), "messages")
    params = build_sampling_params(body, max_tokens)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    group = await start_group(state, request, [prompt_ids], params, request_id)
    if body.stream:
        formatter = ChatChunkFormatter(request_id, model, body.n, body.num_logprobs)
        return stream(state, group, formatter, body.include_usage)
    choices = await collect(request, group)
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=[_choice(c, body.num_logprobs) for c in sorted(choices.values(), key=lambda c: c.index)],
        usage=group.usage(),
    )


def _choice(state: ChoiceState, top_logprobs: int | None) -> ChatChoice:
    logprobs = chat_logprobs(state.logprobs, top_logprobs) if top_logprobs is not None else None
    return ChatChoice(
        index=state.index,
        message=ChatMessageOut(content=state.text),
        logprobs=logprobs,
        finish_reason=state.finish_reason,
    )
