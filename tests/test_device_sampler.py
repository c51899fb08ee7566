"""The device-side sampler against the host Sampler: the same tokens, draw for draw."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from r1serve import SamplingParams
from r1serve.engine.device_sampler import sample_on_device
from r1serve.engine.request import Request
from r1serve.engine.sampler import Sampler


def requests(params: list[SamplingParams], seeds: list[int]) -> list[Request]:
    # Fresh generators each call: both samplers must start from the same random state.
    return [Request(f"r{i}", [1], p, frozenset([0]), 1024, torch.Generator().manual_seed(s))
            for i, (p, s) in enumerate(zip(params, seeds))]


def logits_for(batch: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


CASES = {
    "greedy": [SamplingParams(temperature=0)] * 3,
    "temperature": [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3)],
    "top-k": [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.7, top_k=1)],
    "top-p-min-p": [SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=1.0, min_p=0.2)],
    "mixed": [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=8, top_p=0.9),
              SamplingParams(temperature=0), SamplingParams(temperature=1.1)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_sampler_draws_what_the_host_sampler_draws(case):
    params = CASES[case]
    seeds = [7 * i + 3 for i in range(len(params))]
    for step in range(20):  # generators advance step by step in both
        logits = logits_for(len(params), seed=step)
        if step == 0:
            host_reqs, device_reqs = requests(params, seeds), requests(params, seeds)
        host = Sampler()(logits.clone(), host_reqs).token_ids
        device = sample_on_device(logits.clone(), device_reqs)
        assert device.dtype == torch.long and device.device == logits.device
        assert device.tolist() == host


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch():
    p = SamplingParams(temperature=1.0, top_k=10)
    alone = sample_on_device(logits_for(1), requests([p], [42]))
    logits = torch.cat([logits_for(1), logits_for(2, seed=9)])
    together = sample_on_device(logits, requests([p, SamplingParams(temperature=0.5), SamplingParams(temperature=0)],
                                                 [42, 1, 2]))
    assert together[0] == alone[0]


def test_sampler_on_device_option_gives_the_same_tokens():
    params = CASES["mixed"]
    seeds = [1, 2, 3, 4]
    logits = logits_for(4)
    assert Sampler(on_device=True)(logits, requests(params, seeds)).token_ids == \
        Sampler()(logits, requests(params, seeds)).token_ids


def test_the_device_sampler_does_not_import_the_host_sampler():
    # Both draw from engine/sampling_distribution.py; the host Sampler imports this module at
    # its top, so an import back would make the two a cycle.
    code = ("import sys, r1serve.engine.device_sampler; "
            "assert 'r1serve.engine.sampler' not in sys.modules, 'device_sampler imports sampler'")
    subprocess.run([sys.executable, "-c", code], check=True)
