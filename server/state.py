"""ServerState: what every route needs (engine, settings, metrics), kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from qalora_runtime.engine.protocol import EngineClient

from .errors import APIError
from .metrics import ServerMetrics
from .settings import ServerSettings


@dataclass
class ServerState:
    """The shared, long-lived objects of one app."""

    engine: EngineClient
    settings: ServerSettings
    metrics: ServerMetrics
    model_name: str
    created: int = 0  # unix time the app was built, reported by /v1/models
    accepting: bool = True

    def check_model(self, requested: str | None) -> str:
        """The served name to report; 404 for a model this server does not serve."""
        names = self.settings.served_model_names or (self.model_name,)
        if requested is None or requested in names:
            return self.model_name
        raise APIError(
            404,
            f"the model '{requested}' does not exist; this server serves {', '.join(repr(n) for n in names)}",
            param="model",
            code="model_not_found",
            type="invalid_request_error",
        )

    def check_ready(self) -> None:
        """503 while the engine is loading or dead, or the server is draining for shutdown."""
        if not self.accepting:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if not self.engine.is_healthy:
            raise APIError(503, "the engine is not available (loading or stopped); retry later",
                           code="engine_unavailable")


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's ServerState."""
    return request.app.state.qalora
