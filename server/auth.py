"""Bearer API-key check as ASGI middleware, ahead of routing and body parsing.

Protects the API (``/v1/*``, ``/tokenize``, ``/detokenize``); ``/health``,
``/metrics``, ``/version`` and the OpenAPI docs stay open so probes and
scrapers need no secret. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_json

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/docs", "/redoc", "/ping"})


def is_protected(path: str) -> bool:
    """True for paths that need the API key."""
    return path not in OPEN_PATHS and not path.startswith("/docs")


class APIKeyMiddleware:
    """401 with an OpenAI error body unless ``Authorization: Bearer <api_key>`` matches."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is None or not hmac.compare_digest(token, self._key):
            message = "missing API key (send 'Authorization: Bearer <key>')" if token is None else "invalid API key"
            logger.info("401 for %s %s: %s", scope["method"], scope["path"], message)
            body = error_json(401, message, "invalid_api_key")
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None
