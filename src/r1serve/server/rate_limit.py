"""Per-key request and token rates, as token buckets (in this process: with several servers
each enforces the limits on its own share of the traffic).

A key with rpm=R holds up to R request tokens, refilled at R/60 per second; tpm likewise
in LLM tokens. A request takes 1 request token and its worst-case LLM tokens up front;
what it did not use is given back when it ends.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` could be taken (0 now). A request bigger than the bucket
        waits for a full bucket rather than forever."""
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.per_second


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, key_id: str, kind: str, per_minute: int) -> TokenBucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None or bucket.capacity != per_minute:  # new key, or its limit was changed
            bucket = self._buckets[(key_id, kind)] = TokenBucket(per_minute, per_minute / 60)
        return bucket

    def acquire(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> float:
        """Take one request and `tokens`; returns 0, or the seconds to wait (nothing taken)."""
        with self._lock:
            now = time.monotonic()
            wanted = [(self._bucket(key_id, "rpm", rpm), 1)] if rpm is not None else []
            if tpm is not None:
                wanted.append((self._bucket(key_id, "tpm", tpm), tokens))
            for bucket, _ in wanted:
                bucket.refill(now)
            wait = max((b.wait_for(n) for b, n in wanted), default=0.0)
            if wait > 0 or any(b.capacity == 0 for b, _ in wanted):
                return math.inf if any(b.capacity == 0 for b, _ in wanted) else wait
            for bucket, n in wanted:
                bucket.level -= min(n, bucket.capacity)
            return 0.0

    def give_back(self, key_id: str, tokens: int) -> None:
        with self._lock:
            bucket = self._buckets.get((key_id, "tpm"))
            if bucket is not None and tokens > 0:
                bucket.level = min(bucket.capacity, bucket.level + tokens)
