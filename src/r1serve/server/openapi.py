"""What /openapi.json says each route answers, beyond the request models in protocol.py.

The handlers build their bodies as dicts (and stream chunks straight to bytes), so the
models here describe them rather than make them: tests/test_api_fuzz.py checks every
response it provokes against them. Every error has OpenAI's body (errors.ErrorBody),
declared per route with the statuses the route can answer, and "4XX" for the rest of
the client errors (405, 413): FastAPI's 422 never happens here (errors.py) and is not
published.

A streamed response is declared as `text/event-stream` with a schema per event (OpenAPI
3.1 reading, as Schemathesis validates it): `data` is a JSON chunk, an error, or `[DONE]`.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from r1serve.server.errors import ErrorBody

REF = "#/components/schemas/{model}"

# Documents the `Authorization: Bearer sk-…` header that access.py reads; it checks
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


class Doc(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


FinishReason = Literal["stop", "length", "abort"] | None


# ---- generation ---------------------------------------------------------------------------------


class PromptTokensDetails(Doc):
    cached_tokens: int


class CompletionTokensDetails(Doc):
    reasoning_tokens: int
    reasoning_truncated: bool = Field(description="thinking was ended by its budget or the answer reserve")


class Usage(Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int


class TopLogprob(Doc):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Doc):
    content: list[TokenLogprob]


class ReplyMessage(Doc):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | None = None  # reasoning models only


class ChatChoice(Doc):
    index: int
    message: ReplyMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Doc):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(Doc):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionChunk(Doc):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]  # empty in the usage chunk
    usage: Usage | None = None  # with stream_options.include_usage: null, then the totals last


class CompletionLogprobs(Doc):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Doc):
    index: int  # prompt_index * n + choice
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Completion):
    """A streamed completion's event: the same body, with usage only in the last one."""

    usage: Usage | None = None


# ---- models, tokens, health ---------------------------------------------------------------------


class ModelCard(Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(Doc):
    object: Literal["list"]
    data: list[ModelCard]


class Tokens(Doc):
    count: int
    max_model_len: int
    tokens: list[int]


class Text(Doc):
    prompt: str


class Health(Doc):
    status: Literal["ok", "loading", "draining", "failed", "unavailable"]
    error: str | None = None
    database: Literal["ok", "unreachable"] | None = Field(None, description="the key and usage database, once loaded")
    unsettled: int | None = Field(None, description="requests whose usage waits in the local journal for the "
                                                    "database (settled when it answers again)")


# ---- keys and usage -----------------------------------------------------------------------------


class KeyInfo(Doc):
    id: str
    name: str
    prefix: str
    is_admin: bool
    quota_tokens: int | None
    used_tokens: int
    remaining_tokens: int | None
    rpm: int | None
    tpm: int | None
    created_at: str
    revoked: bool


class NewKeyInfo(KeyInfo):
    key: str  # the secret: in this response only


class ListedKey(KeyInfo):
    last_used_at: str | None = Field(None, description="its latest request (ISO 8601, UTC); null: none yet")


class KeyList(Doc):
    object: Literal["list"]
    data: list[ListedKey]


class UsageRow(Doc):
    day: str | None = None  # the group's columns: those asked for (`by`)
    model: str | None = None
    key: str | None = None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int
    charged_tokens: int
    cost: float  # at the price table's rates when each request settled
    currency: str


class OwnUsage(Doc):
    object: Literal["usage"]
    key: KeyInfo | None  # null on an open server
    data: list[UsageRow]


class AllUsage(Doc):
    object: Literal["usage"]
    data: list[UsageRow]


# ---- what a route declares ----------------------------------------------------------------------


# ---- Anthropic's Messages API (anthropic_messages.py) --------------------------------------------


class AnthropicErrorDetail(Doc):
    type: str
    message: str


class AnthropicError(Doc):
    """Every error of the Messages routes: Anthropic's shape."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class OutText(Doc):
    type: Literal["text"]
    text: str


class OutThinking(Doc):
    type: Literal["thinking"]
    thinking: str
    signature: str = Field(description="this server's signature of the thinking: send the block back as it came")


class OutToolUse(Doc):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(Doc):
    input_tokens: int = Field(description="prompt tokens not served from the prefix cache")
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int = Field(description="prompt tokens served from the prefix cache")
    reasoning_truncated: bool = Field(description="r1serve's: thinking was ended by its budget or the answer reserve")


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "thinking_truncated"]


class AnthropicReply(Doc):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[OutThinking | OutText | OutToolUse]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: AnthropicUsage


class InputTokens(Doc):
    input_tokens: int


class TextDelta(Doc):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(Doc):
    type: Literal["thinking_delta"]
    thinking: str


class SignatureDelta(Doc):
    type: Literal["signature_delta"]
    signature: str


class InputJsonDelta(Doc):
    type: Literal["input_json_delta"]
    partial_json: str


class MessageStart(Doc):
    type: Literal["message_start"]
    message: AnthropicReply


class BlockStart(Doc):
    type: Literal["content_block_start"]
    index: int
    content_block: OutThinking | OutText | OutToolUse


class BlockDelta(Doc):
    type: Literal["content_block_delta"]
    index: int
    delta: TextDelta | ThinkingDelta | SignatureDelta | InputJsonDelta


class BlockStop(Doc):
    type: Literal["content_block_stop"]
    index: int


class ReplyStop(Doc):
    stop_reason: StopReason | None
    stop_sequence: str | None


class ReplyDelta(Doc):
    type: Literal["message_delta"]
    delta: ReplyStop
    usage: AnthropicUsage


class Marker(Doc):
    type: Literal["message_stop", "ping"]


class AnthropicEvent(Doc):
    """One streamed event's data (its `event:` line names the same type)."""

    root: MessageStart | BlockStart | BlockDelta | BlockStop | ReplyDelta | Marker | AnthropicError


# ---- OpenAI's Responses API (responses_api.py) ----------------------------------------------------


class ResponsesUsage(Doc):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(description="cached_tokens: those the prefix cache served")
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(description="reasoning_tokens")
    total_tokens: int


class ResponsesReply(Doc):
    """A response: its output items are `reasoning` (R1's thinking), `message` and
    `function_call` items, as OpenAI writes them."""

    id: str
    object: Literal["response"]
    created_at: int
    model: str
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    output: list[dict[str, Any]]
    usage: ResponsesUsage | None
    previous_response_id: str | None = None


class ResponsesEvent(Doc):
    """One streamed event: response.created, response.output_item.added, response.output_text.delta, …,
    response.completed (or response.failed); its `event:` line names the same type."""

    type: str
    sequence_number: int


class DeletedResponse(Doc):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


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
