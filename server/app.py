"""build_app: the FastAPI application around one EngineClient.

Middleware, outermost first: HTTP metrics (sees every answer, 401/413
included), API-key check (before any body is read), body-size limit, then
FastAPI's routing with OpenAI-shaped error handlers.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from starlette.responses import Response

import qalora_runtime
from qalora_runtime.engine.protocol import EngineClient

from .auth import APIKeyMiddleware
from .disconnect import ClientDisconnected
from .errors import install_error_handlers
from .http_metrics import HTTPMetricsMiddleware
from .limits import BodySizeLimitMiddleware
from .metrics import ServerMetrics
from .openapi import install_openapi
from .routes import ROUTERS
from .settings import ServerSettings
from .state import ServerState

logger = logging.getLogger(__name__)

# nginx's convention for "client closed the request": the answer nobody reads.
CLIENT_CLOSED_STATUS = 499


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    """An app serving ``engine`` with the OpenAI API, metrics, auth and limits of ``settings``."""
    model_name = settings.served_model_names[0] if settings.served_model_names else engine.model_info.name
    metrics = ServerMetrics(engine, model_name)
    state = ServerState(engine=engine, settings=settings, metrics=metrics, model_name=model_name,
                        created=int(time.time()))
    engine.add_step_listener(metrics.on_step)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("serving model %r", model_name)
        state.accepting = True  # an app may be started again after a shutdown (test clients do)
        yield
        # uvicorn has stopped accepting and drained connections (up to its graceful
        # timeout) by now; whatever still runs in the engine is given the rest.
        state.accepting = False
        logger.info("shutting down the engine (drain timeout %.0fs)", settings.drain_timeout_s)
        await engine.shutdown(timeout=settings.drain_timeout_s)

    app = FastAPI(
        title="qalora-serve",
        version=qalora_runtime.__version__,
        description="OpenAI-compatible server for merged QA-LoRA low-bit models.",
        lifespan=lifespan,
    )
    app.state.qalora = state
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    install_openapi(app)

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        logger.info("client left before the answer of %s %s was ready", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_STATUS)

    app.add_exception_handler(ClientDisconnected, on_disconnect)

    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    return app
