"""Every error the server returns has OpenAI's body: {"error": {"message", "type", "param", "code"}}.

Status codes follow OpenAI: 400 bad request (a bad value is 400, not FastAPI's 422: OpenAI
clients map 422 to a generic error), 401 bad key, 404 unknown model or route, 413 body too
large, 429 too busy (with Retry-After), 500 server bug, 503 loading or draining.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1serve.errors import InvalidRequestError

log = logging.getLogger("r1serve.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          403: "permission_error", 404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 431: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What error_body() writes: the schema's model of every error response."""

    error: ErrorDetail


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


# The Anthropic Messages routes answer in Anthropic's shape: {"type": "error", "error": {"type",
# "message"}}, with its type names (its SDKs pick their exception class by status, and read these).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
ANTHROPIC_PATHS = ("/v1/messages", "/anthropic/")


def speaks_anthropic(path: str) -> bool:
    return path.startswith(ANTHROPIC_PATHS)


def status_of(body: dict) -> int:
    """The status an error body (OpenAI's shape) was written for, from its type."""
    kind = body["error"].get("type")
    return next((status for status, t in _TYPES.items() if t == kind), 500)


def anthropic_error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def error_response(request: Request, status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error body (OpenAI's shape) as the route's clients read errors."""
    if speaks_anthropic(request.url.path):
        body = anthropic_error_body(status, body["error"]["message"])
    return JSONResponse(body, status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_SOURCES = ("body", "query", "path", "header")


def _field_path(loc: tuple) -> list[str]:
    # pydantic puts the tried member of a union in the path ("str", "list[TextPart]",
    # "constrained-str"); a client's field names never have brackets or dashes.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in _SOURCES else [str(p) for p in loc]
    return [p for p in parts if p.isidentifier() or p.isdigit()]


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    # The deepest error is the most specific: for a union, the member the value came closest to.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('msg')})", None
    if first.get("type") == "invalid_unicode":  # its message names the field, from the top of the body
        return first["msg"], first["ctx"]["param"]
    if first.get("type") == "missing" and not loc:
        return "the request body is missing; send a JSON object", None
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}", (loc[0] if loc else None)


def _not_json(request: Request) -> tuple[str, None] | None:
    """The slip behind most bodies that fail validation whole: `curl -d` sends
    application/x-www-form-urlencoded unless told otherwise, and the body is not read as JSON."""
    kind = request.headers.get("content-type", "")
    if request.method != "POST" or not kind or "json" in kind.lower():
        return None
    return (f"the body was sent as {kind.split(';')[0]}; send JSON with the header 'Content-Type: application/json' "
            "(curl: -H 'Content-Type: application/json')", None)


# OpenAI routes for what r1serve serves no model of: said plainly rather than "Not Found".
_NOT_SERVED = {"/v1/embeddings": "an embedding model", "/v1/images/generations": "an image model",
               "/v1/audio/transcriptions": "a speech model", "/v1/audio/speech": "a speech model",
               "/v1/moderations": "a moderation model"}


def _no_route(request: Request) -> str:
    path = request.url.path
    if path in _NOT_SERVED:
        return (f"r1serve serves no {_NOT_SERVED[path].removeprefix('an ').removeprefix('a ')} here: {path} is "
                "not available. It serves text generation: /v1/chat/completions and /v1/completions.")
    return (f"no route {request.method} {path}. r1serve serves /v1/chat/completions, /v1/completions, "
            "/v1/models, /tokenize, /health, /metrics and more: see /docs")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _not_json(request) or _validation_message(exc)
        return error_response(request, 400, error_body(400, message, param, "invalid_value"))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError):
        return error_response(request, 400, error_body(400, str(exc), None, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = _no_route(request)
        return error_response(request, exc.status_code, error_body(exc.status_code, message), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(request, 500, error_body(500, f"internal server error ({type(exc).__name__})"))


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (413) before they are read into memory."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        # A chunked body: read it here, up to the limit, then hand it on as one message.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        await JSONResponse(error_body(413, f"the request body is larger than {self.max_bytes} bytes"),
                           status_code=413)(scope, receive, send)
