"""Speculative decoding's policy: which requests draft, how many tokens, and its counters.

A step's drafts are chosen to make the step's expected tokens per second highest, by what
this engine measured a decode step to cost at each number of rows (StepCosts):

    B decoding requests make B rows; a draft adds one. Request i's j-th draft yields a
    token with probability a_i^j, a_i its running acceptance rate (new requests: 0.5).
    Candidate drafts are taken most likely first, and the step keeps the prefix n that
    maximises (B + sum of their probabilities) / cost(B + n).

A verification row costs what a decode row costs (drafts are laid out as decode rows), and
that cost differs by platform: on a 2-core EPYC a one-sequence step verifying 4 drafts
cost 1.10-1.40x one without on the AVX512 kernels and 1.54-1.61x on the AVX2 ones
(docs/speculative.md). So the table is measured as the engine runs, every decode step
timed under its row count; a count not yet seen is extrapolated from those seen below it
(at least PRIOR_ROW_COST per row). As the batch grows, each draft's chance must beat the
tokens per row the step already makes, and past a few sequences none does: speculation
turns itself off. A step never holds more than speculative_max_rows rows.

Within that, a request drafts at most num_speculative_tokens, nothing past max_tokens or
max_model_len, and one whose guesses failed until even alone it would not draft tries one
token once per PROBE_EVERY x B steps, to notice a change. A request being forced (a reasoning
budget's end marker), or whose grammar is not past its reasoning, drafts nothing; a
constrained request's drafts are cut at the first token its grammar refuses.
"""
from __future__ import annotations

from r1serve.config import EngineConfig
from r1serve.engine.drafter import Drafter
from r1serve.engine.request import ReasoningState, Request
from r1serve.engine.spec_decode_stats import SpecDecodeStats

PRIOR_ROW_COST = 0.1  # a row count's cost before it is measured: +10% of a step per row
STEP_COST_WEIGHT = 0.1  # weight of a new step time in its row count's running mean
PROBE_EVERY = 8
PRIOR_ACCEPTANCE = 0.5  # a new request's acceptance rate, before it has drafted
ACCEPTANCE_DECAY = 0.7  # weight of the past in the running rate, per verified draft token
MIN_WORTH = 0.02  # a draft less likely than this is not tried (but for the probe)


class StepCosts:
    """Seconds a decode step takes by its number of rows, measured as the engine runs."""

    def __init__(self, max_rows: int) -> None:
        self.seconds = [0.0] * (max_rows + 1)  # [rows]: running mean; 0: not seen yet

    def observe(self, rows: int, seconds: float) -> None:
        if 0 < rows < len(self.seconds):
            old = self.seconds[rows]
            self.seconds[rows] = seconds if old == 0 else old + STEP_COST_WEIGHT * (seconds - old)

    def costs(self) -> list[float]:
        """[rows]: a step's cost in any consistent unit, non-decreasing in rows. A count not
        seen yet is extrapolated from the seen ones below it: at the per-row slope between
        the two largest (PRIOR_ROW_COST of a one-row step with fewer), never flatter."""
        out, seen, last = [0.0], [], 0.0
        for rows in range(1, len(self.seconds)):
            t = self.seconds[rows]
            if t:
                seen.append((rows, t))
            elif not seen:
                t = 1 + PRIOR_ROW_COST * (rows - 1)
            else:
                (r1, t1) = seen[-1]
                slope = t1 * PRIOR_ROW_COST / (1 + PRIOR_ROW_COST * (r1 - 1))
                if len(seen) > 1:
                    r0, t0 = seen[-2]
                    slope = max(slope, (t1 - t0) / (r1 - r0))
                t = t1 + slope * (rows - r1)
            last = max(last, t)
            out.append(last)
        return out


def plan_drafts(acceptance: list[float], caps: list[int], costs: list[float]) -> list[int]:
    """Draft lengths for a step of len(acceptance) decoding requests (each at most caps[i])
    that maximise expected tokens per unit of step cost; costs[rows] as StepCosts gives."""
    b = len(acceptance)
    candidates = sorted(((a ** j, i) for i, (a, cap) in enumerate(zip(acceptance, caps))
                         for j in range(1, cap + 1) if a ** j >= MIN_WORTH), reverse=True)
    candidates = candidates[:max(0, len(costs) - 1 - b)]
    best_n, best, tokens = 0, b / costs[b] if b < len(costs) else 0.0, float(b)
    for n, (p, _) in enumerate(candidates, start=1):
        tokens += p
        if tokens / costs[b + n] > best:
            best_n, best = n, tokens / costs[b + n]
    ks = [0] * b
    for _, i in candidates[:best_n]:
        ks[i] += 1
    return ks


class Speculation:
    def __init__(self, config: EngineConfig, drafter: Drafter, adaptive: bool = True) -> None:
        self.k = config.num_speculative_tokens
        self.max_rows = config.speculative_max_rows
        self.drafter = drafter
        # False: every request drafts the most its length allows, whatever its acceptance
        # and the step's cost (what a measurement of the verification's cost wants).
        self.adaptive = adaptive
        self.stats = SpecDecodeStats()
        self.step_costs = StepCosts(self.max_rows)
        self._acceptance: dict[str, float] = {}
        self._idle_steps: dict[str, int] = {}

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` rows ran in `seconds` (forward and sampling)."""
        self.step_costs.observe(rows, seconds)

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
        caps = [min(self.k, self._room(r)) if self._may_draft(r) else 0 for r in decoding]
        for req, drafts in zip(decoding, self.drafter.propose(decoding, self._plan(decoding, caps))):
            if drafts and req.grammar is not None:
                drafts = drafts[:req.grammar.matcher.validate_tokens(drafts)]
            req.draft_token_ids = drafts

    def _plan(self, decoding: list[Request], caps: list[int]) -> list[int]:
        if len(decoding) >= self.max_rows or not any(caps):
            return [0] * len(decoding)  # no room for a draft: the common case of a full batch
        if not self.adaptive:
            return [min(cap, self.max_rows // len(decoding) - 1) for cap in caps]
        rates = [self._acceptance.get(r.request_id, PRIOR_ACCEPTANCE) for r in decoding]
        costs = self.step_costs.costs()
        ks = plan_drafts(rates, caps, costs)
        # A request whose guesses failed until even alone it would not draft tries one now
        # and then (once per PROBE_EVERY steps of the whole batch), to notice a change.
        hopeless = costs[2] / costs[1] - 1 if self.max_rows >= 2 else 1.0
        rows = len(decoding) + sum(ks)
        for i, req in enumerate(decoding):
            if ks[i] == 0 and caps[i] and rates[i] < hopeless and rows < self.max_rows \
                    and self._probe(req, len(decoding)):
                ks[i], rows = 1, rows + 1
        return ks

    def forget(self, request_id: str) -> None:
        self.drafter.forget(request_id)
        self._acceptance.pop(request_id, None)
        self._idle_steps.pop(request_id, None)

    def _probe(self, req: Request, batch: int) -> bool:
        every = PROBE_EVERY * batch
        idle = self._idle_steps.get(req.request_id, 0) + 1
        self._idle_steps[req.request_id] = idle % every
        return idle >= every

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
