"""The thinking switch and effort, as the DeepSeek API takes them, for each model family.

Clients say whether a model thinks with `thinking: {"type": "enabled" | "disabled"}` (OpenAI
and Anthropic formats), `reasoning_effort` (OpenAI), `output_config.effort` (Anthropic) or
`reasoning.effort` (Responses). Models differ in how they are told:

- templates with a switch (Qwen3's `enable_thinking`, DeepSeek V3.1 and later's `thinking`)
  are given it, and write the prompt themselves;
- R1 and its distills always open a think block in the prompt (`<think>\\n`): "disabled"
  closes it empty (`<think>\\n\\n</think>\\n\\n`), the form the hybrid models use for no
  thinking, so the answer starts at once.

Effort is a reasoning budget (the most tokens thinking may take before `</think>` is forced):
low 1,024, high 8,192, max unlimited. DeepSeek's names are low, high and max; OpenAI's
minimal counts as low, medium and xhigh as high, ultra as max, and none turns thinking off.
A request's own `max_reasoning_tokens` wins over its effort.

Whatever the budget, thinking also ends where only the answer reserve of max_tokens is left
(`reasoning_reserve`; default a quarter of max_tokens, at most 1,024 tokens; 0 turns it
off), so a reply cut by max_tokens still has an answer; the usage says when thinking was cut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from r1serve.sampling_params import SamplingParams
from r1serve.server.reasoning import END, START

EFFORT_LEVELS = {"none": "none", "minimal": "low", "low": "low", "medium": "high", "high": "high", "xhigh": "high",
                 "max": "max", "ultra": "max"}
EFFORT_BUDGET: dict[str, int | None] = {"low": 1024, "high": 8192, "max": None}
# The variables a template reads to switch thinking (Qwen3; DeepSeek V3.1, V3.2, V4).
SWITCHES = ("enable_thinking", "thinking")
EMPTY_THINKING = f"{START}\n\n{END}\n\n"


@dataclass(frozen=True)
class Thinking:
    """What a request asked of thinking: on, off, or the model's default (None), and a budget."""

    enabled: bool | None = None
    budget: int | None = None

    @classmethod
    def of(cls, switch: str | None, effort: str | None) -> Thinking:
        level = EFFORT_LEVELS[effort] if effort is not None else None
        enabled = {"enabled": True, "disabled": False}.get(switch or "")
        if level == "none":
            enabled = False
        budget = EFFORT_BUDGET.get(level) if level not in (None, "none") and enabled is not False else None
        return cls(enabled, budget)


def template_switches(source: str | None) -> tuple[str, ...]:
    """The thinking switches a template reads (its source names them as variables)."""
    if not source:
        return ()
    return tuple(name for name in SWITCHES if re.search(rf"\b{name}\b", source))


def switch_kwargs(thinking: Thinking, switches: tuple[str, ...]) -> dict[str, bool]:
    return {} if thinking.enabled is None else {name: thinking.enabled for name in switches}


def without_thinking(prompt: str) -> str:
    """A prompt whose template opened a think block (R1's), with the block closed empty."""
    stripped = prompt.rstrip()
    if not stripped.endswith(START):
        return prompt
    return stripped[: -len(START)] + EMPTY_THINKING


# The answer reserve: thinking ends at max_tokens - reserve, so a reply cut by max_tokens still
# has an answer (an R1 reply that thinks to the limit otherwise ends with empty content).
RESERVE_SHARE, RESERVE_MOST = 4, 1024


def answer_reserve(max_tokens: int, asked: int | None) -> int:
    """The tokens kept for the answer: as asked, else a quarter of max_tokens, at most 1,024."""
    return asked if asked is not None else min(max_tokens // RESERVE_SHARE, RESERVE_MOST)


def reserve_answer(params: SamplingParams, asked: int | None) -> SamplingParams:
    """`params` whose thinking budget leaves the answer its reserve of max_tokens."""
    spec = params.reasoning
    if spec is None or params.max_tokens is None:
        return params
    limit = max(params.max_tokens - answer_reserve(params.max_tokens, asked), 0)
    if spec.max_tokens is not None and spec.max_tokens <= limit:
        return params
    return replace(params, reasoning=replace(spec, max_tokens=limit))
