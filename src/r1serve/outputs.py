"""What the engine hands back per request, shaped as vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the chosen token and the top k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: SampleLogprobs | None = None
    num_reasoning_tokens: int = 0  # tokens spent thinking (counted when SamplingParams.reasoning is set)
    reasoning_cut: bool = False  # thinking was ended by its budget (ReasoningSpec.max_tokens), not by the model

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # set when the engine failed this request (it is then finished, reason "abort")
