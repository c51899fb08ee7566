"""A model's Jinja chat template, rendered exactly as `transformers.apply_chat_template` renders it.

Models are trained on the text their template produces, so every detail that changes the text
matters: trim_blocks/lstrip_blocks, a `tojson` that keeps non-ASCII and does not HTML-escape,
`tools`/`documents` passed as None (templates test `tools is not none`), and messages with
None-valued keys dropped (OpenAI clients send `content: null` next to tool calls).

Templates come from model repositories, i.e. they are untrusted code: they run in Jinja's
immutable sandbox.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1serve.errors import InvalidRequestError, ModelLoadError

# Older and newer names for a message's reasoning; templates read `reasoning_content` or `thinking`.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    def __init__(self, source: str):
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(
                f"the model's chat template does not compile (line {exc.lineno}: {exc.message})."
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        special_tokens: Mapping[str, str],
        **template_kwargs: Any,
    ) -> str:
        """`special_tokens` maps bos_token/eos_token/... to text; template_kwargs override them."""
        variables = {"tools": None, "documents": None, **special_tokens, **_plain(template_kwargs)}
        try:
            return self._template.render(
                messages=[_normalize_message(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            # raise_exception() in templates reports bad conversations ("roles must alternate").
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}") from exc


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class ToolArguments(str):
    """A tool call's arguments as templates use them: the JSON text where a template
    concatenates it (DeepSeek's), the object where it serializes it with tojson or walks its
    items (Qwen's, and transformers' convention of passing a dict)."""

    value: Any

    @classmethod
    def of(cls, text: str) -> ToolArguments | str:
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            return text  # not JSON: the text as the client sent it
        arguments = cls(text)
        arguments.value = value
        return arguments

    def items(self):
        return self.value.items() if isinstance(self.value, dict) else ()


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' -- wrong for prompts.
    return json.dumps(_unwrapped(value), ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _unwrapped(value: Any) -> Any:
    if isinstance(value, ToolArguments):
        return value.value
    if isinstance(value, dict):
        return {k: _unwrapped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrapped(v) for v in value]
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    # The sandbox already refuses to read dunder attributes; this refuses to store them too.
    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_attribute_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attribute_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attribute_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r}).")


class _GenerationTag(Extension):
    # Training templates wrap assistant turns in {% generation %} ... {% endgeneration %} to mark
    # the tokens that carry loss. For inference the block renders its body unchanged.
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    plain = _plain(message)
    if not isinstance(plain, dict):
        raise InvalidRequestError(f"each chat message must be a mapping with 'role' and 'content', got {message!r}.")
    plain = {key: value for key, value in plain.items() if value is not None}
    reasoning = next((plain[key] for key in _REASONING_KEYS if key in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


def _plain(value: Any) -> Any:
    # Templates see only JSON-like data: a fresh copy of mappings and lists, with dataclasses and
    # pydantic models (what API layers pass) turned into dicts.
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return value
