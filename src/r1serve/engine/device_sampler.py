"""Drawing a step's tokens on the device: no host sync until the caller reads the result.

The host path of engine/sampler.py reads the greedy tokens back (`.tolist()`) and then one
`int(argmax)` per sampling request: 1 + R device-to-host syncs per step, each stalling the
CPU until the GPU has finished everything queued before it. Here every row is decided by
tensor ops and the result stays on the device:

    greedy rows   argmax(logits)
    random rows   argmax(probs / q), q ~ Exp(1) drawn with the request's own generator

The exponential race is the host path's, draw for draw (same generator calls in the same
order, the same probabilities from engine/sampling_distribution.py), so a seeded request
samples the same tokens either way; tests/test_device_sampler.py checks that. Penalties are
applied before, by the Sampler, and logprobs after, from the same logits.
"""
from __future__ import annotations

import torch

from r1serve.engine.request import Request
from r1serve.engine.sampling_distribution import filtered_probs


def sample_on_device(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    # logits: (B, V) float32, row b belongs to requests[b] -> (B,) int64 token ids on logits' device
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]  # host data: no sync
    if not random_rows:
        return tokens
    rows = torch.tensor(random_rows, device=logits.device)
    probs = filtered_probs(logits[rows], [requests[i] for i in random_rows])  # (R, V)
    # One generator per request keeps a request's draws independent of the rest of the batch.
    race = torch.stack([torch.empty_like(probs[j]).exponential_(generator=requests[i].generator)
                        for j, i in enumerate(random_rows)])
    return tokens.index_copy(0, rows, torch.argmax(probs / race, dim=-1))
