"""What /openapi.json says each route answers, beyond the request models in protocol.py:
the statuses and bodies a route declares (the bodies' models in openapi_replies.py and
openapi_formats.py).

The handlers build their bodies as dicts (and stream chunks straight to bytes), so the
models describe them rather than make them: tests/test_api_fuzz.py checks every
response it provokes against them. Every error has OpenAI's body (errors.ErrorBody),
declared per route with the statuses the route can answer, and "4XX" for the rest of
the client errors (405, 413): FastAPI's 422 never happens here (errors.py) and is not
published.

A streamed response is declared as `text/event-stream` with a schema per event (OpenAPI
3.1 reading, as Schemathesis validates it): `data` is a JSON chunk, an error, or `[DONE]`.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from r1serve.server.errors import ErrorBody
from r1serve.server.openapi_formats import AnthropicEvent, ResponsesEvent
from r1serve.server.openapi_replies import ChatCompletionChunk, CompletionChunk

REF = "#/components/schemas/{model}"

# Documents the `Authorization: Bearer sk-…` header that accounts.py reads; it checks
# nothing itself (an open server takes requests without a key).
API_KEY = Security(HTTPBearer(auto_error=False, description="an API key, once any exists (see platform.md)"))

WHEN = {
    400: "a bad value, bad JSON, or a feature this server does not support",
    401: "no key, or an unknown or revoked one (once any key exists)",
    402: "the key's quota cannot cover this request's worst case",
    403: "the route needs an admin key",
    404: "no such model (or key)",
    429: "the queue is full, or the key's rpm / tpm are spent (see Retry-After)",
    503: "the model is loading, the server draining, or the engine stopped",
    "4XX": "any other client error (405 wrong method, 413 body too large)",
}


def _events(chunk: type[BaseModel], error: type[BaseModel]) -> dict:
    data: dict[str, Any] = {"contentMediaType": "application/json",
                            "contentSchema": {"anyOf": [{"$ref": REF.format(model=m.__name__)}
                                                        for m in dict.fromkeys(_members(chunk) + [error])]}}
    if error is ErrorBody and chunk is not ResponsesEvent:  # chat and completions streams end with [DONE]
        data = {"type": "string", "if": {"const": "[DONE]"}, "else": data}
    else:
        data = {"type": "string"} | data
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _members(chunk: type[BaseModel]) -> list[type[BaseModel]]:
    # A union of event types is stated as a model with a `root` field: its members are the events.
    root = chunk.model_fields.get("root")
    return list(root.annotation.__args__) if root is not None else [chunk]


def responses(ok: type[BaseModel] | None, *errors: int | str, stream: type[BaseModel] | None = None,
              ok_status: int = 200, error: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """A route decorator's `responses`: `ok` as JSON (and `stream` as SSE events), and the
    error body (OpenAI's unless `error` says) for each status in `errors` plus any other 4xx."""
    declared: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        declared[ok_status] = {"model": ok}
        if stream is not None:
            declared[ok_status] |= {"content": {"text/event-stream": _events(stream, error)},
                                    "description": "JSON, or with stream true server-sent events"}
    for status in (*errors, "4XX"):
        declared[status] = {"model": error, "description": WHEN[status]}
    return declared


STREAMED = (ChatCompletionChunk, CompletionChunk, ErrorBody, ResponsesEvent, *_members(AnthropicEvent))


def publish_stream_models(app: FastAPI) -> None:
    """FastAPI publishes the models routes name; the SSE event schemas point at chunk models
    no route names, so add those to the components too."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        _, defs = models_json_schema([(m, "serialization") for m in STREAMED], ref_template=REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
