"""Speculative decoding's counters: drafted and accepted tokens, per position too.

Kept free of torch: the load generator (bench serve) reads them from a server's /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verifications: requests in steps that scored drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts accepted at position j

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification emits on average: accepted drafts plus the target's own one."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def since(self, later: SpecDecodeStats) -> SpecDecodeStats:
        """What was counted between this reading and a later one."""
        per_pos = [n - (self.accepted_per_position[j] if j < len(self.accepted_per_position) else 0)
                   for j, n in enumerate(later.accepted_per_position)]
        return SpecDecodeStats(later.num_drafts - self.num_drafts, later.num_draft_tokens - self.num_draft_tokens,
                               later.num_accepted_tokens - self.num_accepted_tokens, per_pos)

    def __add__(self, other: SpecDecodeStats) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                               self.num_accepted_tokens + other.num_accepted_tokens,
                               sum_positions([self.accepted_per_position, other.accepted_per_position]))

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        while len(self.accepted_per_position) < num_drafted:
            self.accepted_per_position.append(0)
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1


def sum_positions(rows) -> list[int]:
    """Per-position counts of several sources added up (their lengths may differ)."""
    width = max((len(r) for r in rows), default=0)
    return [sum(r[j] for r in rows if j < len(r)) for j in range(width)]
