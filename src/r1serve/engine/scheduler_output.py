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
    # Drafted tokens after the last known one, scored in the same pass (num_tokens counts them).
    draft_token_ids: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The step's input tokens for this request: known ones, then the drafts."""
        known = self.request.token_ids[self.start:self.end - len(self.draft_token_ids)]
        return known + list(self.draft_token_ids) if self.draft_token_ids else known

    @property
    def is_decode(self) -> bool:
        """One known token (and any drafts): each position can be its own decode row."""
        return self.samples and self.num_tokens == 1 + len(self.draft_token_ids)


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
