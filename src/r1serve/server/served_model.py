"""A model the server answers for: its public name, its engine, and how its output is read."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from r1serve.config import EngineConfig
from r1serve.engine.async_engine import AsyncEngine
from r1serve.errors import InvalidRequestError
from r1serve.server.generic_tools import GENERIC_FORMAT
from r1serve.server.metrics import ServerMetrics
from r1serve.server.reasoning import END, PARSERS
from r1serve.tool_calls import FORMATS, PARSERS as TOOL_PARSERS, ToolCallFormat, detect_format


@dataclass(frozen=True)
class ModelSpec:
    """What to load and serve: from the command line, validated before anything loads."""

    name: str  # the `model` clients send
    path: Path  # resolved checkpoint (catalog entry, .gguf file or HF directory)
    engine: EngineConfig
    reasoning_parser: str = "auto"  # "auto": deepseek_r1 when the vocabulary has a </think> token
    tool_call_parser: str = "auto"  # "auto": the format the chat template writes tool calls in

    def __post_init__(self) -> None:
        if self.reasoning_parser not in ("auto", *PARSERS):
            raise InvalidRequestError(f"reasoning_parser={self.reasoning_parser!r}; use auto, {', '.join(PARSERS)}")
        if self.tool_call_parser not in TOOL_PARSERS:
            raise InvalidRequestError(f"tool_call_parser={self.tool_call_parser!r}; use {', '.join(TOOL_PARSERS)}")


@dataclass(frozen=True)
class ServedModel:
    name: str
    engine: AsyncEngine
    reasoning: bool  # split <think>…</think> into reasoning_content
    metrics: ServerMetrics
    created: int
    root: str
    tool_format: ToolCallFormat | None = None  # how the model's template writes tool calls; None: it has none

    @property
    def call_format(self) -> ToolCallFormat:
        """The format its calls are read and enforced in: the template's, else the generic one
        that generic_tools.py teaches it in the prompt."""
        return self.tool_format or GENERIC_FORMAT

    @cached_property  # read for every streamed chunk
    def fingerprint(self) -> str:
        # Changes when the weights or the engine build change, as OpenAI's system_fingerprint does.
        digest = hashlib.blake2b(f"{self.root}|{self.created}".encode(), digest_size=4).hexdigest()
        return f"r1serve-{digest}"


def uses_reasoning(spec: ModelSpec, engine: AsyncEngine) -> bool:
    if spec.reasoning_parser != "auto":
        return spec.reasoning_parser == "deepseek_r1"
    # R1 and its distills have </think> as one token of their vocabulary; models that never
    # think do not, and would otherwise have all their output shown as reasoning.
    return engine.tokenizer.token_to_id(END) is not None


def tool_format(spec: ModelSpec, engine: AsyncEngine) -> ToolCallFormat | None:
    if spec.tool_call_parser == "none":
        return None
    if spec.tool_call_parser != "auto":
        return FORMATS[spec.tool_call_parser]
    return detect_format(engine.tokenizer.chat_template)
