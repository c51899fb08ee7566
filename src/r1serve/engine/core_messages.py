"""The messages between an AsyncEngine and its engine core: one frozen class per kind.

    front end -> core (commands)          core -> front end (replies)
    ----------------------------          ---------------------------
    AddRequest                            Added     the add's answer: the prompt's ids, or why not
    AbortRequest                          Stepped   one loop iteration's outputs and counters
    Shutdown                              Failed    a step failed: these requests are over
                                          Stopped   the loop ended (error None: it was told to)
                                          while loading: EngineInfo, or LoadFailed

Both sides dispatch on the class. They cross the engine process's pipe by pickle; Stepped is
the hot one (one per step), and its outputs go without their prompts, which crossed once
already (in AddRequest, and as ids in Added).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import get_args

from r1serve.engine.engine_stats import EngineStats
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams

# What a request's prompt may be: text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}.
Prompt = str | list[int] | dict


def prompt_text(prompt: Prompt) -> str | None:
    """The prompt's text, where it has one: its outputs carry it back (cores send them
    without their prompts, which crossed once already)."""
    return prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None


# ---- commands: front end -> core ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop the loop; the commands that arrived with it are not applied."""


Command = AddRequest | AbortRequest | Shutdown


# ---- replies: core -> front end -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """How an engine's model is spread (LLMEngine.layout)."""

    tensor_parallel_size: int = 1
    replica: tuple[int, int] | None = None  # (this replica, replicas) under DP attention
    experts: tuple[int, int] | None = None  # the routed experts [first, end) rank 0 holds; None: no MoE


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """The engine process has loaded its model: what the server needs to know of it."""

    max_model_len: int
    dtype: str = "float32"  # the activations' torch dtype, by name
    vocab_size: int = 0  # the model's (logit_bias and token ids are checked against it)
    layout: ModelLayout = ModelLayout()


@dataclass(frozen=True, slots=True)
class LoadFailed:
    error: BaseException  # what loading raised, or a RuntimeError with its message if it does not pickle


@dataclass(frozen=True, slots=True)
class Added:
    request_id: str
    error: BaseException | None  # why the engine refused the request; None: it is queued
    prompt_token_ids: list[int] | None  # the prompt as the engine tokenized it; None if refused


@dataclass(frozen=True, slots=True)
class Stepped:
    outputs: list[RequestOutput]  # this step's, one per request that produced something
    stats: EngineStats  # the engine's counters after the step


@dataclass(frozen=True, slots=True)
class Failed:
    request_ids: list[str]  # the requests of a batch whose step raised, now aborted
    message: str


@dataclass(frozen=True, slots=True)
class Stopped:
    error: str | None  # why the loop ended; None: it was told to stop


Reply = Added | Stepped | Failed | Stopped


def check_command(command: object) -> None:
    """Refuse a non-command where it is sent (the caller's mistake), not later in the loop."""
    if not isinstance(command, Command):
        raise TypeError(f"not an engine core command: {unknown_message(command, Command)}")


def unknown_message(message: object, kinds: UnionType) -> str:
    names = ", ".join(k.__name__ for k in get_args(kinds))
    return f"got {type(message).__name__}, expected one of {names}"
