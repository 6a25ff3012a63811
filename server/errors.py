"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Every path that can fail maps to one status: 400 invalid request (schema
violations included, never FastAPI's 422 body), 401 bad API key, 404 unknown
model or route, 405 wrong method, 413 body too large, 429 queue full (with
Retry-After), 503 engine unhealthy, 500 only for bugs.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error a client caused (or may retry); rendered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        """This error as an HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` with all four keys always present."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_json(status: int, message: str, code: str | None = None) -> bytes:
    """An encoded error body, for ASGI middleware that answers without FastAPI."""
    body = error_body(message, _TYPE_BY_STATUS.get(status, "invalid_request_error"), None, code)
    return json.dumps(body).encode()


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first few schema errors, and the offending parameter."""
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"request body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    parts = []
    param = None
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)]
        where = ".".join(loc)
        if param is None and where:
            param = where
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 3} more errors)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "function-after", "function-before"})


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member an error came from ("str", "list[int]"): not a field.
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-"))


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    if exc.status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return exc.response()


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _describe_validation_error(exc)
    logger.info("rejected %s %s: %s", request.method, request.url.path, message)
    return APIError(400, message, param=param, code="invalid_value").response()


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"route not found: {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
    return APIError(status, message, headers=dict(exc.headers or {})).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug in the server, never the client's fault: log the traceback, say little.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type to an OpenAI-shaped JSON body."""
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
