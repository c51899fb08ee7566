"""The engine's counters after its latest step, as one typed value.

LLMEngine.stats() makes it; every engine core sends it beside each step's outputs (Stepped),
so the server reads the latest without locking; data-parallel replicas' are merged into one
(EngineStats.merged); /metrics exports every field (server/metrics.py). Kept free of torch:
the server process reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from r1serve.engine.spec_decode_stats import SpecDecodeStats, sum_positions


@dataclass(frozen=True)
class EngineStats:
    # Not slots: a frozen slotted dataclass unpickles field by field through Python
    # (__setstate__), twice as slow as this one's __dict__, and one crosses the pipe per step.
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # blocks in use over num_kv_blocks
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens served from cached blocks
    prefix_cache_evictions: int = 0  # cached blocks reused for other tokens (block_pool.py)
    num_steps: int = 0  # loop iterations (steps and command batches)
    grammar_wait_seconds: float = 0.0  # engine/grammar.py MaskFiller.seconds
    # Speculative decoding (engine/spec_decode_stats.py).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()

    @property
    def spec(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.spec_num_drafts, self.spec_num_draft_tokens, self.spec_num_accepted_tokens,
                               list(self.spec_accepted_per_position))

    @classmethod
    def merged(cls, parts: list[EngineStats]) -> EngineStats:
        """Several replicas' stats as one engine's: counts summed, KV usage over all blocks."""
        summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(cls)
                  if f.name not in ("kv_cache_usage", "spec_accepted_per_position")}
        blocks, free = summed["num_kv_blocks"], summed["num_free_blocks"]
        return cls(**summed, kv_cache_usage=(blocks - free) / blocks if blocks else 0.0,
                   spec_accepted_per_position=tuple(sum_positions([p.spec_accepted_per_position for p in parts])))
