"""The bodies and events of the two other API formats r1serve speaks, as /openapi.json
publishes them: Anthropic's Messages API (anthropic_messages.py) and OpenAI's Responses API
(responses_api.py)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from r1serve.server.openapi_replies import Doc


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
