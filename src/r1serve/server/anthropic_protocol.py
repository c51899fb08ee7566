"""Anthropic's Messages API request bodies (POST /v1/messages and /v1/messages/count_tokens).

The role of a turn decides the blocks it may hold (user: text, tool_result; assistant: text,
thinking, tool_use), so the published schema states what the server takes. Unknown fields
(metadata, service_tier, cache_control on a block) are ignored, as the chat route ignores
them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from r1serve.server.protocol import FUNCTION_NAME, Request, StopString, when, with_rules
from r1serve.server.valid_text import ValidText


class TextBlock(Request):
    type: Literal["text"]
    text: str


class _TextContent(Request):
    """A model whose `content` may hold blocks: images and documents are refused by name (as the
    chat route refuses image parts), before the union of block types says only that the tag
    matched none of them."""

    @model_validator(mode="before")
    @classmethod
    def _readable(cls, data: Any) -> Any:
        blocks = data.get("content") if isinstance(data, dict) else None
        for block in blocks if isinstance(blocks, list) else ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in ("image", "document"):
                raise ValueError(f"r1serve's models read text only: an {kind} block cannot be read; send text")
        return data


class ToolUseBlock(Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_TextContent):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = Field(None, description="as this server wrote it; left out: taken as sent")


class RedactedThinkingBlock(Request):
    type: Literal["redacted_thinking"]
    data: str


UserBlock = Annotated[TextBlock | ToolResultBlock, Field(discriminator="type")]
AssistantBlock = Annotated[TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock,
                           Field(discriminator="type")]


class UserTurn(_TextContent):
    role: Literal["user"]
    content: str | list[UserBlock]


class AssistantTurn(_TextContent):
    role: Literal["assistant"]
    content: str | list[AssistantBlock]


MessageParam = Annotated[UserTurn | AssistantTurn, Field(discriminator="role")]


class AnthropicTool(Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    input_schema: dict[str, Any]


class AutoChoice(Request):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class AnyChoice(Request):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class NamedChoice(Request):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class NoChoice(Request):
    type: Literal["none"]


ToolChoice = Annotated[AutoChoice | AnyChoice | NamedChoice | NoChoice, Field(discriminator="type")]
NEEDS_TOOLS = when("tool_choice", {"properties": {"type": {"enum": ["any", "tool"]}}},
                   {"tools": {"type": "array", "minItems": 1}}, sent=("tools",))


class ThinkingConfig(Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0, description="with enabled: the most tokens thinking may take")


class OutputConfig(Request):
    effort: Literal["low", "medium", "high", "max"] | None = Field(
        None, description="how long thinking may run (thinking.py: low 1,024 tokens, medium and high 8,192, max "
                          "unlimited)")


class PromptedRequest(Request, ValidText):
    """What a Messages request and a count_tokens request share: the prompt."""

    model_config = with_rules(NEEDS_TOOLS)

    model: str = Field("", description="a served model's name; empty: the first one")
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None

    @model_validator(mode="after")
    def _choice_needs_tools(self):
        if self.tool_choice is not None and self.tool_choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice.type!r} needs tools to choose from")
        return self


class CountTokensRequest(PromptedRequest):
    pass


class MessagesRequest(PromptedRequest):
    """Anthropic's request body. Unknown fields (metadata, service_tier, cache_control on a
    block) are ignored, as the chat route ignores them."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[StopString] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = False
    reasoning_reserve: int | None = Field(None, ge=0, description="r1serve's: tokens of max_tokens kept for the "
                                                                  "answer (default a quarter, at most 1,024; 0: off)")
