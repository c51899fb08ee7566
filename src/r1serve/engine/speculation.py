"""Speculative decoding's policy: which requests draft, how many tokens, and its counters.

How many tokens a request drafts next step is the smallest of:

    num_speculative_tokens            the user's k
    speculative_max_rows // B - 1     B decoding requests: a verification row costs a row of
                                      the step, and a step's cost grows with its rows (on a
                                      CPU, SmolLM2: 1 + k rows cost about 1 + 0.1k; 16 cost
                                      2.5x one; docs/speculative.md). At B > max_rows / 2
                                      nothing is drafted: speculation turns itself off.
    the request's own worth           k maximising expected tokens per step over its cost,
                                      (1 - a^(k+1)) / (1 - a) / (1 + ROW_COST * k), a being
                                      the request's running acceptance rate: a request whose
                                      guesses keep failing stops paying for them (one token
                                      is tried every PROBE_EVERY steps, to notice a change)
    what is left                      max_tokens and max_model_len: no drafts past the end

and a request that is being forced (a reasoning budget's end marker), or whose grammar is
not past its reasoning, drafts nothing. A constrained request's drafts are cut at the first
token its grammar refuses.
"""
from __future__ import annotations

from r1serve.config import EngineConfig
from r1serve.engine.drafter import Drafter
from r1serve.engine.request import ReasoningState, Request
from r1serve.engine.spec_decode_stats import SpecDecodeStats

# What one more draft adds to a one-sequence decode step, relative to the step: SmolLM2 on a
# 2-core AVX512 EPYC, `r1serve bench speculative` (k = 1: 1.01-1.15x, 2: 1.10-1.29x, 4: 1.41-1.53x,
# 7: 1.8-2.0x; docs/speculative.md). Break-even for one draft: 10% acceptance.
ROW_COST = 0.1
PROBE_EVERY = 8
PRIOR_ACCEPTANCE = 0.5  # a new request's acceptance rate, before it has drafted
ACCEPTANCE_DECAY = 0.7  # weight of the past in the running rate, per verified draft token


def best_draft_length(acceptance: float, k_max: int) -> int:
    """The k in 0..k_max with the most expected tokens per unit of step cost."""
    def worth(k: int) -> float:
        expected = sum(acceptance ** j for j in range(k + 1))  # 1 + a + ... + a^k
        return expected / (1 + ROW_COST * k)
    return max(range(k_max + 1), key=worth)


class Speculation:
    def __init__(self, config: EngineConfig, drafter: Drafter, adaptive: bool = True) -> None:
        self.k = config.num_speculative_tokens
        self.max_rows = config.speculative_max_rows
        self.drafter = drafter
        # False: every request drafts the most the batch and its length allow, whatever its
        # acceptance (what a measurement of the verification's cost wants).
        self.adaptive = adaptive
        self.stats = SpecDecodeStats()
        self._acceptance: dict[str, float] = {}
        self._idle_steps: dict[str, int] = {}

    def batch_limit(self, num_decoding: int) -> int:
        """Draft tokens per request a step of num_decoding requests allows."""
        return max(0, min(self.k, self.max_rows // max(num_decoding, 1) - 1))

    def record(self, request: Request, drafted: int, accepted: int) -> None:
        self.stats.record(drafted, accepted)
        rate = self._acceptance.get(request.request_id, PRIOR_ACCEPTANCE)
        for j in range(drafted):  # each drafted position verified: 1 if accepted, else 0
            if j > accepted:
                break  # positions after the first rejection were never tested
            rate = ACCEPTANCE_DECAY * rate + (1 - ACCEPTANCE_DECAY) * (j < accepted)
        self._acceptance[request.request_id] = rate

    def propose(self, requests: list[Request]) -> None:
        """Set each decoding request's draft_token_ids for the next step."""
        decoding = []
        for req in requests:
            if req.is_decoding:
                decoding.append(req)
            else:
                req.draft_token_ids = []
        limit = self.batch_limit(len(decoding))
        ks = [min(limit, self._worth(r), self._room(r)) if limit and self._may_draft(r) else 0 for r in decoding]
        for req, drafts in zip(decoding, self.drafter.propose(decoding, ks)):
            if drafts and req.grammar is not None:
                drafts = drafts[:req.grammar.matcher.validate_tokens(drafts)]
            req.draft_token_ids = drafts

    def forget(self, request_id: str) -> None:
        self.drafter.forget(request_id)
        self._acceptance.pop(request_id, None)
        self._idle_steps.pop(request_id, None)

    def _worth(self, req: Request) -> int:
        if not self.adaptive:
            return self.k
        k = best_draft_length(self._acceptance.get(req.request_id, PRIOR_ACCEPTANCE), self.k)
        if k:
            self._idle_steps.pop(req.request_id, None)
            return k
        idle = self._idle_steps.get(req.request_id, 0) + 1
        self._idle_steps[req.request_id] = idle % PROBE_EVERY
        return 1 if idle == PROBE_EVERY else 0

    @staticmethod
    def _room(req: Request) -> int:
        # Emitting k drafts + 1 must not pass max_tokens or max_model_len.
        p = req.params
        left = req.max_model_len - req.num_tokens
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - req.num_output_tokens)
        return max(0, left - 1)

    @staticmethod
    def _may_draft(req: Request) -> bool:
        if req.forced_token_ids:
            return False
        if req.grammar is not None and req.reasoning_state in (ReasoningState.UNKNOWN, ReasoningState.OPEN):
            return False  # the mask's rules differ around the reasoning markers
        return True
