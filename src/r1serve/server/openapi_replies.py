"""The bodies r1serve's OpenAI-format routes answer, as /openapi.json publishes them:
chat and completions (whole and streamed), models, tokens, health, keys and usage.

The handlers build their bodies as dicts, so these models describe them rather than make
them; tests/test_api_fuzz.py checks every response it provokes against them (openapi.py).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
