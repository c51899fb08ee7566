"""Continuous batching over a paged KV cache."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

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
            if not self._make_room(req, n, preempted):
                break
            chunks.append(self._chunk(req, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        return SchedulerOutput(chunks=chunks, preempted=preempted)

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

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req, start, n, self.kv.block_table(req.request_id), samples=start + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        # Recompute, not swap: the request's prompt and outputs are kept, its K/V dropped.
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests after the model ran; returns those that finished."""
        finished = []
        for chunk in output.chunks:
            req = chunk.request
            req.num_computed_tokens = chunk.end
            self.kv.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is not None:
                req.append_token(token)
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
