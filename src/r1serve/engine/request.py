"""A request as the engine tracks it: its tokens, progress through the KV cache, and why it ended."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from r1serve.engine.grammar import RequestGrammar
from r1serve.outputs import SampleLogprobs
from r1serve.sampling_params import SamplingParams


class ReasoningState(enum.Enum):
    UNKNOWN = "unknown"  # the output may still open with the start marker
    OPEN = "open"
    CLOSED = "closed"
    NONE = "none"  # the output began with something else: no reasoning


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    generator: torch.Generator
    arrival_time: float = field(default_factory=time.monotonic)
    # prompt + output; appended to in place so the scheduler never concatenates per step.
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served; None until first admitted
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: SampleLogprobs | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    num_reasoning_tokens: int = 0  # output tokens up to and including the end-of-thinking marker
    reasoning_cut: bool = False  # the budget ended thinking: the end marker was forced
    reasoning_state: ReasoningState = ReasoningState.NONE
    # Tokens the engine emits in place of the sampled ones (the end-of-thinking marker when
    # the reasoning budget is spent). Substituted before the token is fed back to the model.
    forced_token_ids: list[int] = field(default_factory=list)
    # Constrained decoding (engine/grammar.py): follows the output once any reasoning is over.
    grammar: RequestGrammar | None = None
    # Speculative decoding: tokens a drafter proposes after the last one, verified by the
    # next step (written to the cache as ordinary tokens, rolled back where rejected).
    draft_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.reasoning is not None:
            spec = self.params.reasoning
            self.reasoning_state = ReasoningState.OPEN if spec.open_at_start else ReasoningState.UNKNOWN

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> int:
        """Append the sampled token (or a forced one in its place); returns the token appended."""
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if self._reasoning_budget_spent():
            self.forced_token_ids = list(self.params.reasoning.end_ids)
            self.reasoning_cut = True
        if self.forced_token_ids:
            token_id = self.forced_token_ids.pop(0)
        self.token_ids.append(token_id)
        before = self.reasoning_state
        if self.params.reasoning is not None:
            self._track_reasoning()
        if self.grammar is not None:
            self._advance_grammar(token_id, before)
            if self.finished:
                return token_id
        self.check_token_stop(token_id)
        return token_id

    @property
    def is_decoding(self) -> bool:
        """Every token but the last is in the cache: the next step computes one (plus drafts)."""
        return self.num_computed_tokens == self.num_tokens - 1 and not self.finished

    def grammar_row(self) -> tuple[object, int | None] | None:
        """What constrains the next token: (matcher, an extra allowed token id), or None (free).
        Before the output has shown whether it reasons, it may also open its reasoning."""
        if self.grammar is None or self.reasoning_state is ReasoningState.OPEN:
            return None
        start = self.params.reasoning.start_ids if self.params.reasoning is not None else ()
        if self.reasoning_state is ReasoningState.UNKNOWN and len(start) == 1:
            return self.grammar.matcher, start[0]
        # A marker of several tokens is not offered: its first token is ordinary text ("<"),
        # which the grammar's own text may begin with.
        return self.grammar.matcher, None

    def _advance_grammar(self, token_id: int, before: ReasoningState) -> None:
        state = self.reasoning_state
        if state is ReasoningState.UNKNOWN:
            # Still unknown after a token only where the marker has several tokens and this one
            # began it: the grammar's own text (grammar_row offers no such marker), not thinking.
            self.reasoning_state, self.num_reasoning_tokens = ReasoningState.NONE, 0
            state = ReasoningState.NONE
        if state is ReasoningState.OPEN or (state is ReasoningState.CLOSED and before is not ReasoningState.CLOSED):
            return  # thinking, or the end marker's own tokens: the constraint starts after them
        if not self.grammar.accept(token_id):
            self.finish("stop", stop_reason="grammar")  # a token the grammar refused (a forced one)
        elif self.grammar.done:
            self.finish("stop")  # the output is complete: nothing but the end could follow

    def _track_reasoning(self) -> None:
        # Constant work per token: only the output's first and last few ids are looked at.
        spec = self.params.reasoning
        n_prompt, n_out = len(self.prompt_token_ids), self.num_output_tokens
        if self.reasoning_state is ReasoningState.UNKNOWN:
            head = tuple(self.token_ids[n_prompt:n_prompt + min(n_out, len(spec.start_ids))])
            if head != spec.start_ids[:len(head)]:
                self.reasoning_state, self.num_reasoning_tokens = ReasoningState.NONE, 0
                return
            if len(head) == len(spec.start_ids):
                self.reasoning_state = ReasoningState.OPEN
        if self.reasoning_state in (ReasoningState.NONE, ReasoningState.CLOSED):
            return
        self.num_reasoning_tokens += 1
        end = len(spec.end_ids)
        if n_out >= end and tuple(self.token_ids[-end:]) == spec.end_ids:
            self.reasoning_state = ReasoningState.CLOSED
            self.forced_token_ids.clear()

    def _reasoning_budget_spent(self) -> bool:
        spec = self.params.reasoning
        return (spec is not None and spec.max_tokens is not None and not self.forced_token_ids
                and self.reasoning_state is ReasoningState.OPEN and self.num_reasoning_tokens >= spec.max_tokens)

    def check_token_stop(self, token_id: int) -> None:
        """Stops decided by token ids; stop strings are decided by the detokenizer."""
        p = self.params
        n_out = self.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token_id in self.eos_token_ids:
                self.finish("stop")
                return
            if token_id in p.stop_token_ids:
                self.finish("stop", stop_reason=token_id)
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or self.num_tokens >= self.max_model_len:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
