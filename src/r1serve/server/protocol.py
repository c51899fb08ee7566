"""The OpenAI / DeepSeek wire format: request bodies validated by pydantic, response shapes.

Unknown request fields are ignored, as the OpenAI API ignores them; known fields with bad
values are rejected (400, never 422: see errors.py). The published schema (/openapi.json)
states every rule these models check: types and ranges as Field constraints, and the rules
that tie two fields together as JSON Schema `dependentSchemas` ("when this field is sent
with this value, that one must be ...") next to the validator that checks them; the
validators keep their messages, which say what to send instead. A few rules no schema can
state are checked later, still as a 400: prompt + max_tokens within the context, token ids
within the vocabulary, an assistant message last for continue_final_message, best_of equal
to n, a non-empty prompt on models without a BOS token.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from r1serve.server.thinking import EFFORT_LEVELS, Thinking
from r1serve.server.valid_text import ValidText, invalid_text

NonNegInt = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1)]
# What a chat template gets from the request itself; chat_template_kwargs may not override it.
TEMPLATE_ARGUMENTS = ("messages", "add_generation_prompt", "special_tokens")
TemplateKwargs = Annotated[dict[str, Any] | None,
                           Field(json_schema_extra={"propertyNames": {"not": {"enum": list(TEMPLATE_ARGUMENTS)}}})]


def _is_id(t) -> bool:
    # As JSON Schema (and pydantic) read JSON: 5.0 is the integer 5.
    whole = (isinstance(t, int) and not isinstance(t, bool)) or (isinstance(t, float) and t.is_integer())
    return whole and t >= 0


def when(field: str, matches: dict, then: dict, *, sent: tuple[str, ...] = ()) -> dict[str, dict]:
    """A rule as a `dependentSchemas` entry: a body that sends `field` matching `matches` must
    match `then` (a schema per property) and send the properties in `sent`."""
    return {field: {"if": {"properties": {field: matches}},
                    "then": {"properties": then} | ({"required": list(sent)} if sent else {})}}


def with_rules(*rules: dict[str, dict]) -> ConfigDict:
    """A request model's config whose published schema also states `rules`. (As
    dependentSchemas, one per field, not an allOf of if/then: Schemathesis's coverage phase
    finds no valid body for an allOf of several conditions.)"""
    dependent = {field: rule for r in rules for field, rule in r.items()}
    return ConfigDict(extra="ignore", protected_namespaces=(), json_schema_extra={"dependentSchemas": dependent})


STREAM_OPTIONS_NEED_STREAM = when("stream_options", {"type": "object"}, {"stream": {"const": True}}, sent=("stream",))


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @field_validator("n", "stream", "logprobs", "echo", mode="after", check_fields=False)
    @classmethod
    def _null_is_default(cls, v, info: ValidationInfo):
        # OpenAI's schema has these nullable, and clients that pass options through send null.
        return cls.model_fields[info.field_name].default if v is None else v


class StreamOptions(Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage on every chunk


def _token_id_keys_only(schema: dict) -> None:
    # The validator refuses any key that is not a token id; pydantic's schema for a
    # pattern-keyed dict (patternProperties) would let any other key through.
    for branch in schema.get("anyOf", [schema]):
        if "patternProperties" in branch:
            branch["additionalProperties"] = False


class SamplingFields(Request, ValidText):
    """What chat and completions share: sampling and stopping, OpenAI names plus vLLM's extras."""

    model_config = with_rules(STREAM_OPTIONS_NEED_STREAM)

    model: str = Field("", description="a served model's name (GET /v1/models); empty or left out: the first one")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no top-k")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, description="any integer (taken modulo 2**63)")
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    n: int | None = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="only with stream true")
    ignore_eos: bool = False
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]] | None = \
        Field(None, description="token id (as a string) -> bias added to its logit; -100 bans it",
              json_schema_extra=_token_id_keys_only)
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class TextPart(Request):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise ValueError(f"r1serve's models read text only: a {kind!r} part cannot be read; "
                             'send {"type": "text", "text": ...} parts or a string')
        return data


class ToolCallFunction(Request):
    name: str
    arguments: str = Field(description="the arguments as JSON text")

    @field_validator("arguments")
    @classmethod
    def _arguments_are_unicode(cls, v: str) -> str:
        # Templates parse the arguments (chat_template.ToolArguments): a \\ud800 escape inside
        # the JSON text would reach the tokenizer as a lone surrogate.
        if "\\u" in v:
            try:
                found = invalid_text(json.loads(v))
            except ValueError:
                return v  # not JSON: passed on as the text it is
            if found:
                _, text, at = found
                raise ValueError(f"not valid Unicode: the JSON text holds a lone surrogate (\\u{ord(text[at]):04x}); "
                                 "send UTF-8 text (a surrogate pair must be whole)")
        return v


class ToolCallIn(Request):
    """An earlier assistant turn's tool call, as the API returned it."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(Request):
    # Only an assistant message may come without content (one that made tool calls, say).
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
        "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # its thinking: rendered inside a tool loop, dropped before (serving_chat)
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    prefix: bool | None = Field(None, description="DeepSeek's chat prefix completion: the last (assistant) "
                                                  "message, continued as written")

    @model_validator(mode="after")
    def _content_needed(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


class FunctionDefinition(Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Request):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema object")
        return self


class ThinkingSwitch(Request):
    type: Literal["enabled", "disabled"]


class ChatCompletionRequest(SamplingFields):
    model_config = with_rules(
        STREAM_OPTIONS_NEED_STREAM,
        when("top_logprobs", {"type": "integer"}, {"logprobs": {"const": True}}, sent=("logprobs",)),
        when("continue_final_message", {"const": True}, {"add_generation_prompt": {"const": False}},
             sent=("add_generation_prompt",)),
        when("tool_choice", {"anyOf": [{"const": "required"}, {"type": "object"}]},
             {"tools": {"type": "array", "minItems": 1}}, sent=("tools",)))

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="none: all the context left after the prompt")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="only with logprobs true")
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="needs add_generation_prompt false and an "
                                                            "assistant message last")
    chat_template_kwargs: TemplateKwargs = None
    max_reasoning_tokens: int | None = Field(None, ge=0, description="r1serve's thinking budget (reasoning "
                                                                      "models only)")
    reasoning_reserve: int | None = Field(None, ge=0, description="tokens of max_tokens kept for the answer: "
                                          "thinking ends before them (default: a quarter, at most 1,024; 0: off)")
    thinking: ThinkingSwitch | None = Field(None, description="DeepSeek's switch: whether the model thinks "
                                                              "(default: the model's own behaviour)")
    reasoning_effort: Literal[tuple(EFFORT_LEVELS)] | None = Field(  # type: ignore[valid-type]
        None, description="how long thinking may run: low 1,024 tokens, high 8,192, max unlimited; none: no "
                          "thinking (minimal counts as low, medium and xhigh as high, ultra as max)")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without; required or a named one needs tools")
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, v, info: ValidationInfo):
        if (v == "required" or isinstance(v, NamedToolChoice)) and not info.data.get("tools"):
            shown = repr(v) if isinstance(v, str) else f"naming {v.function.name!r}"
            raise ValueError(f"tool_choice {shown} needs tools to choose from")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_template_arguments(cls, v):
        taken = sorted(set(v or ()) & set(TEMPLATE_ARGUMENTS))
        if taken:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(taken)}: the request sets them")
        return v

    @model_validator(mode="after")
    def _check_supported(self):
        prefixed = [i for i, m in enumerate(self.messages) if m.prefix]
        if prefixed:
            if prefixed != [len(self.messages) - 1] or self.messages[-1].role != "assistant":
                raise ValueError("prefix: true goes on the last message only, an assistant message")
            # DeepSeek's spelling of vLLM's continue_final_message
            self.continue_final_message, self.add_generation_prompt = True, False
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message needs add_generation_prompt false and an assistant message last")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    @property
    def tool_mode(self) -> str:
        """none, auto, required, or named (tool_choice names one function)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def thinking_asked(self) -> Thinking:
        return Thinking.of(self.thinking.type if self.thinking else None, self.reasoning_effort)


class CompletionRequest(SamplingFields):
    model_config = with_rules(STREAM_OPTIONS_NEED_STREAM,
                              when("echo", {"const": True}, {"logprobs": {"type": "null"}}))

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default, 16; none: all the context left")
    logprobs: int | None = Field(None, ge=0, le=20, description="the number of alternatives per token")
    echo: bool | None = Field(False, description="not with logprobs (that needs prompt logprobs)")
    suffix: str | None = Field(None, description="fill in the middle: the text after the completion (models with "
                                                 "FIM tokens; prompt as text)")
    best_of: int | None = Field(None, ge=1, le=128, description="only best_of == n (no server-side best-of)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        ok = (isinstance(v, str) or (isinstance(v, list) and v and (
            all(isinstance(p, str) for p in v) or all(_is_id(t) for t in v)
            or all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in v))))
        if not ok:
            raise ValueError("prompt must be a string, a non-empty list of strings, a list of token ids (integers "
                             ">= 0) or a list of such lists")
        return v

    @model_validator(mode="after")
    def _check_supported(self):
        if self.suffix and not all(isinstance(p, str) for p in self.prompts()):
            raise ValueError("suffix needs the prompt as text (a string or a list of strings), not token ids")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which this server does not compute")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens


# What shapes a chat prompt beyond its messages: /tokenize takes them with messages only.
CHAT_ONLY = ("tools", "chat_template_kwargs", "thinking")


class TokenizeRequest(Request, ValidText):
    # Exactly one of prompt and messages (null counts as not sent).
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"},
                                                 **dict.fromkeys(CHAT_ONLY, {"type": "null"})}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}}]})

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    # With messages, what else shapes a chat request's prompt: the count is the chat's own.
    tools: list[Tool] | None = None
    chat_template_kwargs: TemplateKwargs = None
    thinking: ThinkingSwitch | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and any(getattr(self, name) is not None for name in CHAT_ONLY):
            raise ValueError(f"{', '.join(CHAT_ONLY)} go with messages, not prompt")
        return self


class DetokenizeRequest(Request, ValidText):
    model: str | None = None
    tokens: list[NonNegInt]


# ---- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int,
               reasoning_cut: bool = False) -> dict:
    """OpenAI's usage plus DeepSeek's cache fields (hit + miss = prompt tokens), and whether a
    budget or the answer reserve ended some thinking (r1serve's `reasoning_truncated`)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "reasoning_truncated": reasoning_cut},
        "prompt_cache_hit_tokens": cached_tokens,
        "prompt_cache_miss_tokens": prompt_tokens - cached_tokens,
    }
