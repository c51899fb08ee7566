"""Drafters: where speculative decoding's guesses come from.

A drafter proposes, for a request about to decode, up to k tokens that may follow its last
one; the next step scores them all with the target model (engine/rejection_sampler.py), so
a wrong guess costs a row of that step and never the output. Two live here behind one
interface, and a small draft model would be a third:

    NgramDrafter   prompt lookup: the tokens that followed the latest earlier occurrence of
                   the request's last n tokens (n from prompt_lookup_max down to min). Free,
                   and right where the output quotes its input (summaries, code edits, RAG
                   answers, a reasoning model restating the question).
    MTPDrafter     DeepSeek-V3/R1's multi-token-prediction layer (models/deepseek_mtp.py),
                   fed the target's last hidden state (engine/mtp_drafter.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from r1serve.engine.request import Request
from r1serve.engine.scheduler_output import SchedulerOutput


class Drafter(ABC):
    def after_step(self, output: SchedulerOutput) -> None:
        """Called once per step, after its tokens were appended (and rejected drafts rolled
        back)."""

    @abstractmethod
    def propose(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        """For each decoding request, up to ks[i] tokens to follow its last one (fewer, or
        none, where it has no guess; ks[i] may be 0)."""

    def forget(self, request_id: str) -> None:
        """The request ended or was preempted: drop what is kept for it."""


class NgramDrafter(Drafter):
    """Prompt lookup over an index of the request's n-grams, kept up to date as tokens
    arrive: a proposal costs O(max - min) dictionary lookups, not a scan of the context (an
    R1 answer runs to 32k tokens)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, tuple[dict[tuple[int, ...], int], list[int]]] = {}

    def propose(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        return [self._lookup(r, k) if k > 0 else [] for r, k in zip(requests, ks)]

    def _lookup(self, request: Request, k: int) -> list[int]:
        tokens = request.token_ids
        index, indexed = self._index.setdefault(request.request_id, ({}, [0]))
        # Index every n-gram that ends before the last token; the suffix itself is the query.
        for end in range(max(indexed[0], 1), len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                index[tuple(tokens[end - n:end])] = end  # later occurrences win
        indexed[0] = max(indexed[0], len(tokens))
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            end = index.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end:end + k]
        return []

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)
