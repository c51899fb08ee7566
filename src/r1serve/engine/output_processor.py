"""Requests out: each user request (a ParentRequest of its n engine Requests) as
RequestOutputs, from the tokens each step appended: detokenized incrementally, stop strings
applied, whole or as deltas of what was not handed out yet."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from r1serve.engine.detokenizer import IncrementalDetokenizer
from r1serve.engine.request import Request
from r1serve.outputs import CompletionOutput, RequestOutput


@dataclass
class ParentRequest:
    """A user request; with n > 1 it fans out to n engine requests sharing the prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    arrival_time: float = field(default_factory=time.monotonic)
    sent: list[list[int]] = field(default_factory=list)  # per child: [chars, tokens] handed out (delta outputs)
    error: str | None = None  # why the request failed inside the engine, if it did

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self._child_parent: dict[str, ParentRequest] = {}

    def add(self, parent: ParentRequest) -> None:
        self.parents[parent.request_id] = parent
        for child in parent.children:
            self._child_parent[child.request_id] = parent

    def is_empty(self) -> bool:
        return not self.parents and not self._child_parent

    def parent_of(self, child_id: str) -> ParentRequest | None:
        return self._child_parent.get(child_id)

    def remove(self, parent: ParentRequest) -> RequestOutput:
        """The parent's last output; it is forgotten."""
        out = self.output(parent)
        self.parents.pop(parent.request_id, None)
        for child in parent.children:
            self._child_parent.pop(child.request_id, None)
        return out

    def on_token(self, parent: ParentRequest, child: Request, token: int, lp) -> None:
        """A token was appended to child (the sampled one, or one the engine forced in its place)."""
        detok = parent.detoks[next(i for i, c in enumerate(parent.children) if c is child)]
        if lp is not None:
            child.logprobs.append({t: replace(v, decoded_token=self.tokenizer.decode([t])) for t, v in lp.items()})
        stop = detok.add_tokens([token])
        if stop is None and child.finished:
            stop = detok.flush()
        if stop is not None:
            # A stop string: the request ends here, however many tokens the step accepted
            # after this one; the scheduler drops them and frees the blocks.
            child.finish("stop", stop)

    def output(self, parent: ParentRequest) -> RequestOutput | None:
        kind = parent.children[0].params.output_kind
        if kind == "final_only" and not parent.finished:
            return None
        outs = [self._completion(i, c, d, parent.sent[i] if kind == "delta" else None)
                for i, (c, d) in enumerate(zip(parent.children, parent.detoks))]
        first = parent.children[0]
        metrics = {"arrival_time": parent.arrival_time, "first_token_time": first.first_token_time,
                   "first_scheduled_time": first.first_scheduled_time,
                   "num_preemptions": sum(c.num_preemptions for c in parent.children)}
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs,
                             parent.finished, first.num_cached_tokens or 0, metrics, parent.error)

    def _completion(self, index: int, child: Request, detok: IncrementalDetokenizer,
                    sent: list[int] | None) -> CompletionOutput:
        """One choice's output; with `sent` ([chars, tokens] already handed out), only what is
        new: that costs the new part, not the whole output (an R1 answer runs to 32k tokens)."""
        logprobs = child.logprobs
        if sent is None:
            text, token_ids = detok.visible_text(child.finished), child.output_token_ids
        else:
            text = detok.visible_text(child.finished, start=sent[0])
            token_ids = child.token_ids[child.num_prompt_tokens + sent[1]:]
            logprobs = logprobs and logprobs[sent[1]:]
            sent[0] += len(text)
            sent[1] += len(token_ids)
        return CompletionOutput(index, text, token_ids, child.finish_reason, child.stop_reason,
                                list(logprobs) if logprobs is not None else None, child.num_reasoning_tokens,
                                child.reasoning_cut)
