"""ASGI middleware counting HTTP requests and their latency, labelled by route template.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnect
notifications pass through untouched. Unknown paths share the route label
"other", so a scanner cannot blow up the label cardinality.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServerMetrics


class HTTPMetricsMiddleware:
    """Observe method, route, status and time-to-last-byte of every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500  # if the app dies before sending a status, that is what the client sees

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.observe_http(scope["method"], path, status, time.monotonic() - start)
