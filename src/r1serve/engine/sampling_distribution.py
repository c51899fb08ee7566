"""The distribution a token is drawn from: temperature, then top-k, top-p and min-p.

One function for both ways of drawing (engine/sampler.py on the host, engine/device_sampler.py
on the device), so a seeded request samples the same tokens either way.
"""
from __future__ import annotations

import torch

from r1serve.engine.request import Request


def filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    # logits: (R, V) -> probabilities after temperature, top-k, top-p and min-p
    dev = logits.device
    temp = torch.tensor([r.params.temperature for r in requests], device=dev)[:, None]
    logits = logits / temp
    top_k = torch.tensor([r.params.top_k or logits.shape[1] for r in requests], device=dev)
    top_p = torch.tensor([r.params.top_p for r in requests], device=dev)
    min_p = torch.tensor([r.params.min_p for r in requests], device=dev)
    # Decided from the requests, not the tensors: no device-to-host sync.
    if any(0 < (r.params.top_k or 0) < logits.shape[1] or r.params.top_p < 1 for r in requests):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest set whose mass reaches top_p (the first token always stays). Rows
        # with top_p = 1 are left alone: float cumsums reach 1.0 early over a large vocabulary
        # and would cut their tail, only because another request in the batch wanted top-p.
        drop |= ((sorted_probs.cumsum(-1) - sorted_probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if any(r.params.min_p > 0 for r in requests):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, 0.0)
    return probs
