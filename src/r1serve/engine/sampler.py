"""Turns a step's logits into tokens: penalties, temperature, top-k / top-p / min-p, seeds."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1serve.engine.device_sampler import sample_on_device
from r1serve.engine.rejection_sampler import Verified, draft_positions, verify
from r1serve.engine.request import Request
from r1serve.engine.sampling_distribution import filtered_probs
from r1serve.kernels.argmax_rows import argmax_rows_reference
from r1serve.outputs import Logprob


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # (B,) one new token per sampled request
    # Per request: {token_id: Logprob} for the chosen token and the top-k, or None.
    logprobs: list[dict[int, Logprob] | None]


class Sampler:
    kernel_ops = ("argmax_rows",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, on_device: bool = False) -> None:
        # on_device: draw tokens with engine/device_sampler.py, one device-to-host copy per
        # step (the default path syncs once per sampled request; fine on the CPU).
        self.on_device = on_device
        self.argmax_rows = argmax_rows_reference  # (B, V) logits -> (B,) int64

    def __call__(self, logits: torch.Tensor, requests: list[Request], masks=None) -> SampleResult:
        # logits: (B, V) float32, row b belongs to requests[b]. masks: a callable that applies
        # the step's grammar masks to the logits (engine/grammar.py); called as late as it can
        # be, so the masks had the whole forward pass to be computed.
        want_lp = any(r.params.logprobs is not None for r in requests)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None  # vLLM's default: raw model logprobs
        logits = self._apply_penalties(logits, requests)
        if masks is not None:
            masks(logits)
        tokens = self._sample(logits, requests)
        lps = [None] * len(requests)
        if want_lp:
            lps = [_logprobs(raw_logprobs[i], tokens[i], r.params.logprobs) if r.params.logprobs is not None else None
                   for i, r in enumerate(requests)]
        return SampleResult(tokens, lps)

    def verify(self, logits: torch.Tensor, requests: list[Request], drafts: list[tuple[int, ...]],
               masks=None) -> list[Verified]:
        """A step with drafted tokens (engine/rejection_sampler.py). logits: (R, V), request i
        owns len(drafts[i]) + 1 consecutive rows (a request without drafts, one)."""
        rows = draft_positions(requests, drafts)
        want_lp = any(r.params.logprobs is not None for r in requests)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        logits = self._apply_penalties(logits, rows)
        if masks is not None:
            masks(logits)
        emitted = verify(logits, self.argmax_rows(logits).tolist(), requests, drafts, rows)
        out, offset = [], 0
        for req, d, tokens in zip(requests, drafts, emitted):
            k = req.params.logprobs
            lps = None if k is None else [_logprobs(raw_logprobs[offset + j], t, k) for j, t in enumerate(tokens)]
            out.append(Verified(tokens, lps))
            offset += len(d) + 1
        return out

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        if not any(_needs_processing(r) for r in requests):
            return logits  # the common case: no copy of the (B, V) logits
        logits = logits.clone()
        for i, r in enumerate(requests):
            p = r.params
            if r.num_output_tokens < p.min_tokens:  # no ending before min_tokens
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
                # Ids past the vocabulary can never be sampled; indexing with them would fail the step.
                banned = [t for t in banned if t < logits.shape[1]]
                logits[i, banned] = float("-inf")
            if p.logit_bias:
                _add_logit_bias(logits[i], p.logit_bias)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long, device=logits.device)
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and r.num_output_tokens:
                out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        if self.on_device:
            return sample_on_device(logits, requests).tolist()
        greedy = self.argmax_rows(logits).tolist()
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not random_rows:
            return greedy
        probs = filtered_probs(logits[random_rows], [requests[i] for i in random_rows])
        for row, i in enumerate(random_rows):
            # Exponential race (argmax p/q, q ~ Exp(1)) draws from p using only this
            # request's generator: the result does not depend on the rest of the batch.
            q = torch.empty_like(probs[row]).exponential_(generator=requests[i].generator)
            greedy[i] = int(torch.argmax(probs[row] / q))
        return greedy


def _needs_processing(r: Request) -> bool:
    p = r.params
    return (r.num_output_tokens < p.min_tokens or p.repetition_penalty != 1.0
            or bool(p.presence_penalty) or bool(p.frequency_penalty) or bool(p.logit_bias))


def _add_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    # As OpenAI documents it: -100 bans a token (here exactly: -inf), 100 all but selects it.
    ids = torch.tensor([t for t in bias if t < row.numel()], dtype=torch.long, device=row.device)
    values = torch.tensor([b for t, b in bias.items() if t < row.numel()], dtype=row.dtype, device=row.device)
    row.index_add_(0, ids, torch.where(values <= -100, float("-inf"), values))


def _logprobs(row: torch.Tensor, chosen: int, k: int) -> dict[int, Logprob]:
    # row: (V,) raw log-probabilities; rank 1 is the most likely token.
    chosen_lp = float(row[chosen])
    out = {chosen: Logprob(chosen_lp, int((row > row[chosen]).sum()) + 1)}
    if k:
        # k may exceed the vocabulary (only validated as >= 0): then every token is returned,
        # rather than topk failing mid-step and taking the whole batch down with it.
        values, ids = row.topk(min(k, row.numel()))
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(t, Logprob(v, rank))
    return out
