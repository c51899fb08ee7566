"""OpenAI's Responses API request body (POST /v1/responses): input as text or items.

Items: messages (a role and text, or input_text/output_text parts), the assistant's
function_call items and the client's function_call_output items (a tool loop), and
reasoning items sent back (their text is the assistant's thinking). Unknown fields
(metadata, user, truncation, ...) are ignored, as the chat route ignores them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from r1serve.server.protocol import FUNCTION_NAME, Request, when, with_rules
from r1serve.server.thinking import EFFORT_LEVELS
from r1serve.server.valid_text import ValidText


class TextPart(Request):
    type: Literal["input_text", "output_text", "text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind in ("input_image", "input_file", "input_audio"):
            raise ValueError(f"r1serve's models read text only: an {kind} part cannot be read; send input_text")
        return data


class MessageItem(Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class FunctionCallOutputItem(Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningText(Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Request):
    type: Literal["reasoning"]
    content: list[ReasoningText] | None = None
    summary: list[ReasoningText] = Field(default_factory=list)

    def text(self) -> str:
        return "".join(p.text for p in self.content or self.summary)


def _item_type(item: Any) -> str:
    # A message may come without its type ({"role": "user", "content": "Hi"}), as OpenAI takes it.
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_type)]


class FunctionTool(Request):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Request):
    type: Literal["function"]
    name: str


class TextFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=FUNCTION_NAME)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Request):
    format: TextFormat | None = None


class ReasoningConfig(Request):
    effort: Literal[tuple(EFFORT_LEVELS)] | None = None  # type: ignore[valid-type]


class ResponsesRequest(Request, ValidText):
    model_config = with_rules(when("tool_choice", {"anyOf": [{"const": "required"}, {"type": "object"}]},
                                   {"tools": {"type": "array", "minItems": 1}}, sent=("tools",)))

    model: str = Field("", description="a served model's name; empty: the first one")
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = Field(None, description="a system message, for this response only")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool | None = Field(True, description="keep the response (per key) for previous_response_id and GET")
    previous_response_id: str | None = Field(None, description="a stored response this one continues")

    @model_validator(mode="after")
    def _choice_needs_tools(self):
        if (self.tool_choice == "required" or isinstance(self.tool_choice, NamedFunction)) and not self.tools:
            raise ValueError("tool_choice 'required' or a named function needs tools to choose from")
        return self

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)
