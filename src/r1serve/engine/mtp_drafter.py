"""Drafting with DeepSeek-V3/R1's multi-token-prediction layer (filled in below)."""
from __future__ import annotations

from r1serve.engine.drafter import Drafter
from r1serve.errors import ModelLoadError


class MTPDrafter(Drafter):
    needs_hidden_states = True

    @classmethod
    def for_engine(cls, engine) -> "MTPDrafter":
        raise ModelLoadError("speculative='mtp' is not available yet")

    def propose(self, request, k):
        return []
