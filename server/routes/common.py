"""Steps shared by the generation routes: start a request group, then stream or collect it."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from qalora_runtime.sampling_params import SamplingParams

from ..disconnect import cancel_on_disconnect
from ..errors import APIError
from ..generation import ChoiceState, RequestGroup
from ..responses import ErrorResponse
from ..state import ServerState
from ..streaming import ChunkFormatter, sse_response, stream_events

_ERROR_STATUSES = (
    (400, "invalid request (schema, values, context length)"),
    (401, "missing or invalid API key"),
    (404, "unknown model"),
    (413, "request body too large"),
    (429, "queue full; see Retry-After"),
    (503, "engine unavailable"),
)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses (default: all of them), each with the OpenAI error body."""
    return {
        code: {"model": ErrorResponse, "description": desc}
        for code, desc in _ERROR_STATUSES
        if not codes or code in codes
    }


STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "JSON body, or an SSE stream when stream=true"},
}


async def start_group(
    state: ServerState, request: Request, prompts: list[list[int]], params: SamplingParams, request_id: str
) -> RequestGroup:
    """Submit ``prompts``; 429/400/503 surface here, before any response is started."""
    state.check_ready()
    group = RequestGroup(state.engine, state.metrics, retry_after_s=state.settings.retry_after_s)
    await cancel_on_disconnect(request.receive, group.start(prompts, params, request_id))
    return group


async def collect(request: Request, group: RequestGroup) -> dict[int, ChoiceState]:
    """Run a group to the end (aborting it if the client leaves first)."""
    try:
        return await cancel_on_disconnect(request.receive, group.run_to_end())
    finally:
        await group.close()


def stream(state: ServerState, group: RequestGroup, formatter: ChunkFormatter, include_usage: bool) -> Response:
    """The SSE response of a started group."""
    return sse_response(stream_events(group, formatter, include_usage), group, state.settings)


def max_model_len(state: ServerState) -> int:
    """The engine's context length."""
    value = state.engine.model_info.max_model_len
    if value < 2:
        raise APIError(500, f"engine reports max_model_len={value}", code="internal_error")
    return value
