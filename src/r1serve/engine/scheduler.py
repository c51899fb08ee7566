"""Continuous batching over a paged KV cache."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from r1serve.engine.kv_cache_manager import KVCacheManager
from r1serve.engine.request import Request, RequestStatus
from r1serve.engine.scheduler_output import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work within the token budget.

        There are no prefill or decode phases. Each request has `num_computed_tokens`;
        a step lets every request catch up towards `num_tokens`, as far as the budget
        allows. A new prompt (minus its prefix-cache hit) is a long catch-up, possibly
        split over steps (chunked prefill); a decode is a catch-up of one token.
        Running requests go first; when blocks run out the most recently admitted
        running request is preempted (its blocks freed, recomputed later).
        """
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            drafts = self._drafts(req, n, budget)
            if drafts and not self.kv.allocate(req, n + len(drafts)):
                drafts = []  # short of blocks: verify nothing rather than preempt anyone for a guess
            if not drafts and not self._make_room(req, n, preempted):
                break
            chunks.append(self._chunk(req, n, drafts))
            budget -= n + len(drafts)
            i += 1
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        return SchedulerOutput(chunks=chunks, preempted=preempted)

    def _drafts(self, req: Request, n: int, budget: int) -> list[int]:
        """The request's drafted tokens that fit this step's budget (drafts count against it
        like any token); only a request decoding its last known token carries them."""
        if not req.draft_token_ids or n != req.num_tokens - req.num_computed_tokens or n != 1:
            return []
        return req.draft_token_ids[:budget - n]

    def _make_room(self, req: Request, n: int, preempted: list[str]) -> bool:
        while not self.kv.allocate(req, n):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            num_hit = len(cached) * self.kv.block_size
            n = req.num_tokens - req.num_computed_tokens - num_hit
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv.allocate(req, n, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens += num_hit
            if req.num_cached_tokens is None:  # first admission only: a readmission finds its own blocks
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n
        return budget

    def _chunk(self, req: Request, n: int, drafts: list[int] = ()) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req, start, n + len(drafts), self.kv.block_table(req.request_id),
                              samples=start + n == req.num_tokens, draft_token_ids=tuple(drafts))

    def _preempt(self, req: Request) -> None:
        # Recompute, not swap: the request's prompt and outputs are kept, its K/V dropped.
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]],
               on_token: Callable[[Request, int, int], None] | None = None) -> list[Request]:
        """Advance the scheduled requests after the model ran; returns those that finished.

        sampled: per request, the step's new tokens, one per scored position: the last known
        token's successor, then each accepted draft's. They are appended one at a time, and
        each is checked as it would be without speculation (EOS, max_tokens, a reasoning
        budget; stop strings through on_token(request, index, token)): the first that ends
        the request drops the rest. A token that differs from the draft at its position
        (the engine forced another) ends the run too: the next ones were scored after the
        draft. The cache keeps only positions whose tokens stayed; the rest roll back.
        """
        finished = []
        for chunk in output.chunks:
            req = chunk.request
            drafts = chunk.draft_token_ids
            known_end = chunk.end - len(drafts)
            for j, token in enumerate(sampled.get(req.request_id, ())):
                appended = req.append_token(token)
                if on_token is not None:
                    on_token(req, j, appended)
                if req.finished or (j < len(drafts) and appended != drafts[j]):
                    break
            # Positions past the accepted drafts hold rejected ones: not computed.
            req.num_computed_tokens = min(chunk.end, max(known_end, req.num_tokens - 1))
            if drafts and not req.finished:
                self.kv.trim(req, req.num_tokens)
            self.kv.cache_full_blocks(req)
            if req.finished:
                self._remove(req)
                finished.append(req)
        return finished

    def finish(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> Request | None:
        """End a request from outside the step (abort, stop string). Frees its blocks."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        if not req.finished:
            req.finish(reason, stop_reason)
        self._remove(req)
        return req

    def _remove(self, req: Request) -> None:
        if self._requests.pop(req.request_id, None) is None:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
