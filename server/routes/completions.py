"""POST /v1/completions (the legacy text-completion API)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from ..generation import ChoiceState
from ..logprobs import completion_logprobs
from ..prompts import check_context, completion_prompts
from ..protocol import CompletionRequest
from ..responses import CompletionChoice, CompletionResponse
from ..sampling import build_sampling_params
from ..state import ServerState, get_state
from ..streaming import CompletionChunkFormatter
from .common import (
    STREAM_RESPONSE,
    collect,
    error_responses,
    max_model_len,
    start_group,
    stream,
)

router = APIRouter(tags=["openai"])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**STREAM_RESPONSE, **error_responses()},
)
async def create_completion(
    body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> CompletionResponse | Response:
    """Complete one prompt or a batch of prompts; streamed as SSE when ``stream`` is true."""
    state.check_ready()
    model = state.check_model(body.model)
    tokenizer = state.engine.tokenizer
    prompts = completion_prompts(tokenizer, body.prompt)
    limit = max_model_len(state)
    # One SamplingParams for all prompts: the tightest context bound applies to each.
    budgets = [check_context(len(p), body.max_new_tokens, limit, "prompt") for p in prompts]
    params = build_sampling_params(body, min(budgets))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompt_texts = _prompt_texts(tokenizer, body.prompt, prompts) if body.echo else None
    # The text of each prompt's first token: echoed with a null logprob (it has no context).
    first_texts = [tokenizer.decode(p[:1]) for p in prompts] if body.echo and body.logprobs is not None else None
    group = await start_group(state, request, prompts, params, request_id)
    if body.stream:
        formatter = CompletionChunkFormatter(request_id, model, body.n, prompt_texts, body.logprobs, first_texts)
        return stream(state, group, formatter, body.include_usage)
    choices = await collect(request, group)
    ordered = sorted(choices.values(), key=lambda c: c.index)
    return CompletionResponse(
        id=request_id,
        model=model,
        choices=[_choice(c, body, prompt_texts, first_texts) for c in ordered],
        usage=group.usage(),
    )


def _prompt_texts(tokenizer: object, prompt: object, prompts: list[list[int]]) -> list[str]:
    """The text each prompt echoes: the string as sent, or the decoded token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(ids) for ids in prompts]  # type: ignore[attr-defined]


def _choice(
    state: ChoiceState, body: CompletionRequest, prompt_texts: list[str] | None, first_texts: list[str] | None
) -> CompletionChoice:
    prefix = prompt_texts[state.index // body.n] if prompt_texts else ""
    logprobs = None
    if body.logprobs is not None and first_texts is not None:
        # echo: the prompt's tokens (the first with null logprobs) then the completion's, offsets from 0.
        positions = list(state.prompt_logprobs or []) + state.logprobs
        logprobs = completion_logprobs(positions, body.logprobs, 0, first_texts[state.index // body.n])
    elif body.logprobs is not None:
        logprobs = completion_logprobs(state.logprobs, body.logprobs, len(prefix))
    return CompletionChoice(
        index=state.index, text=prefix + state.text, logprobs=logprobs, finish_reason=state.finish_reason
    )
