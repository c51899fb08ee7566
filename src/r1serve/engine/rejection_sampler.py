"""Verifying drafted tokens: which of them the target model accepts, and the token after.

A request with k drafts d_1..d_k is scored at k + 1 positions in one pass: position j gives
the target's distribution p_j for the token after d_1..d_j (p_0 after the last known token).
Walking j = 0, 1, ...:

    greedy    t_j = argmax p_j
    sampled   t_j = a draw from p_j, made as plain decoding makes it: the exponential race
              argmax p_j / q, q ~ Exp(1) from the request's own generator

emit t_j, and go on while t_j equals d_{j+1}. The drafts are point guesses (an n-gram
continuation, the MTP head's argmax), so this accepts d_{j+1} with probability p_j(d_{j+1})
and, on a rejection, emits a draw from p_j without d_{j+1}: the speculative-sampling rule
(Leviathan et al. 2023; Chen et al. 2023; accept with min(1, p/q), resample from
max(p - q, 0)) for a point-mass q, with the same acceptance. Drawing the target's own token
at each position makes the coupling exact beyond the distribution: each emitted token
uses the request's generator once, in order, as without speculation, so a seeded request
gives the same tokens with or without drafts, whatever was drafted and whatever the batch.

Each position's logits are processed as the plain sampler would process them for that
prefix (min_tokens, penalties and logit_bias see the drafts before it; grammar masks were
computed after them), then filtered by the same function (engine/sampling_distribution.py).
Logprobs are the raw model logprobs at each emitted position, as without speculation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from r1serve.engine.request import Request
from r1serve.engine.sampling_distribution import filtered_probs
from r1serve.outputs import Logprob


class DraftPosition:
    """A request as seen at position j of its verification: its tokens plus d_1..d_j. The
    sampler's logits processing reads only the attributes below."""

    def __init__(self, request: Request, drafted: tuple[int, ...]) -> None:
        self.request = request
        self.drafted = drafted
        self.params = request.params
        self.eos_token_ids = request.eos_token_ids
        self.generator = request.generator

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens + len(self.drafted)

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids + list(self.drafted)

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + list(self.drafted)


@dataclass(frozen=True)
class Verified:
    token_ids: list[int]  # the accepted drafts, then one token of the target's own
    logprobs: list[dict[int, Logprob]] | None  # per emitted token, if the request wants them


def draft_positions(requests: list[Request], drafts: list[tuple[int, ...]]) -> list[Request | DraftPosition]:
    """One entry per scored row: request i contributes len(drafts[i]) + 1, in order."""
    rows: list[Request | DraftPosition] = []
    for req, d in zip(requests, drafts):
        rows.append(req)
        rows += [DraftPosition(req, d[:j]) for j in range(1, len(d) + 1)]
    return rows


def verify(processed: torch.Tensor, argmax: list[int], requests: list[Request],
           drafts: list[tuple[int, ...]], rows: list[Request | DraftPosition]) -> list[list[int]]:
    """processed: (rows, V) logits after penalties and masks, laid out as `rows`
    (draft_positions(requests, drafts), which the caller already built for the penalties);
    argmax: their greedy tokens. Returns each request's emitted tokens."""
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = filtered_probs(processed[random_rows], [rows[i] for i in random_rows]) if random_rows else None
    where = {row: i for i, row in enumerate(random_rows)}
    out, offset = [], 0
    for req, d in zip(requests, drafts):
        if req.params.greedy:
            out.append(_accepted_run(lambda j, at=offset: argmax[at + j], d))
        else:
            out.append(_accepted_run(lambda j, at=offset, g=req.generator: _draw(probs[where[at + j]], g), d))
        offset += len(d) + 1
    return out


def _accepted_run(pick: Callable[[int], int], drafts: tuple[int, ...]) -> list[int]:
    """t_j = pick(j) for j = 0, 1, ...: emitted while each equals the draft at its position.
    pick is called only for the positions emitted (a sampled one draws as it is called)."""
    tokens = []
    for j in range(len(drafts) + 1):
        tokens.append(pick(j))
        if j == len(drafts) or tokens[-1] != drafts[j]:
            break
    return tokens


def _draw(p: torch.Tensor, gen: torch.Generator) -> int:
    # The exponential race the plain sampler uses: argmax p / q, q ~ Exp(1), draws from p
    # (p may be unnormalised: min-p zeroes tokens without renormalising).
    q = torch.empty_like(p).exponential_(generator=gen)
    return int(torch.argmax(p / q))
