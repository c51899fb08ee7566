"""What the scheduler decided for one step: the hand-off from scheduler to model runner."""
from __future__ import annotations

from typing import Sequence

from dataclasses import dataclass

from r1serve.engine.request import Request


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (= num_computed_tokens when scheduled)
    num_tokens: int  # tokens computed this step for this request
    block_table: Sequence[int]  # the request's KV blocks, covering start + num_tokens tokens (an int64 array)
    samples: bool  # the chunk reaches the request's last known token, so a new token is sampled

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # in batch order; written by Scheduler.schedule()
    preempted: list[str]  # request ids sent back to waiting this step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
