"""GET /health, GET /metrics and GET /version: open endpoints for probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from starlette.responses import Response

import qalora_runtime

from ..responses import HealthResponse, VersionResponse
from ..state import ServerState, get_state

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "engine loading, dead, or server draining"}},
)
async def health(state: ServerState = Depends(get_state)) -> Response:
    """200 while the engine loop is alive and the model loaded; 503 otherwise."""
    ok = state.accepting and state.engine.is_healthy
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                     "description": "Prometheus text exposition"}},
)
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus metrics (text exposition format 0.0.4)."""
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """The qalora-serve version."""
    return VersionResponse(version=qalora_runtime.__version__)
