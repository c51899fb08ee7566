"""Verifying drafted tokens: which of them the target model accepts, and the token after.

A request with k drafts d_1..d_k is scored at k + 1 positions in one pass: position j gives
the target's distribution p_j for the token after d_1..d_j (p_0 after the last known token).
Walking j = 0, 1, ...:

    greedy    accept d_{j+1} while it is argmax p_j; then emit argmax p_j
    sampled   accept d_{j+1} with probability p_j(d_{j+1}); on rejection emit a draw from
              p_j with d_{j+1} removed (renormalised); after k acceptances, a draw from p_k

Drafts here are deterministic proposals (an n-gram continuation, the MTP head's argmax), so
the draft distribution is a point mass and the standard speculative-sampling rule
(Leviathan et al. 2023; Chen et al. 2023), accept with min(1, p/q) and resample from
max(p - q, 0), takes the form above. Either way each emitted token is distributed exactly as
without speculation: greedy output is the same tokens, sampled output the same distribution.
Every draw uses the request's own seeded generator.

Each position's logits are processed as the plain sampler would process them for that
prefix (min_tokens, penalties and logit_bias see the drafts before it; grammar masks were
computed after them), then filtered by the same function (engine/sampling_distribution.py).
Logprobs are the raw model logprobs at each emitted position, as without speculation.
"""
from __future__ import annotations

from dataclasses import dataclass

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
           drafts: list[tuple[int, ...]]) -> list[list[int]]:
    """processed: (rows, V) logits after penalties and masks, rows as draft_positions lays
    them out; argmax: their greedy tokens. Returns each request's emitted tokens."""
    rows = draft_positions(requests, drafts)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = filtered_probs(processed[random_rows], [rows[i] for i in random_rows]) if random_rows else None
    where = {row: i for i, row in enumerate(random_rows)}
    out, offset = [], 0
    for req, d in zip(requests, drafts):
        if req.params.greedy:
            out.append(_greedy(argmax[offset:offset + len(d) + 1], d))
        else:
            out.append(_sampled(probs, [where[offset + j] for j in range(len(d) + 1)], d, req.generator))
        offset += len(d) + 1
    return out


def _greedy(argmax: list[int], drafts: tuple[int, ...]) -> list[int]:
    tokens = []
    for j, best in enumerate(argmax):
        tokens.append(best)
        if j == len(drafts) or best != drafts[j]:
            break
    return tokens


def _sampled(probs: torch.Tensor, rows: list[int], drafts: tuple[int, ...], gen: torch.Generator) -> list[int]:
    # probs rows may be unnormalised (min-p zeroes tokens without renormalising).
    tokens = []
    for j, row in enumerate(rows):
        p = probs[row]
        if j == len(drafts):
            tokens.append(_draw(p, gen))
            break
        d = drafts[j]
        u = float(torch.rand((), generator=gen, device=p.device))
        if u * float(p.sum()) < float(p[d]):
            tokens.append(d)
            continue
        residual = p.clone()
        residual[d] = 0.0
        tokens.append(_draw(residual, gen))
        break
    return tokens


def _draw(p: torch.Tensor, gen: torch.Generator) -> int:
    # The exponential race the plain sampler uses: argmax p / q, q ~ Exp(1), draws from p.
    q = torch.empty_like(p).exponential_(generator=gen)
    return int(torch.argmax(p / q))
