"""The Sampler at its seam: hand-made logits and hand-built requests."""
from __future__ import annotations

import pytest
import torch

from r1serve import SamplingParams
from r1serve.engine.request import Request
from r1serve.engine.sampler import Sampler
from r1serve.engine.sampling_distribution import filtered_probs

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])  # sorted, so kept sets are prefixes


def make_req(params: SamplingParams, prompt=(1,), output=(), seed=0, eos=(0,)) -> Request:
    r = Request("r", list(prompt), params, frozenset(eos), 1024, torch.Generator().manual_seed(seed))
    r.token_ids.extend(output)
    return r


def kept(params: SamplingParams, logits: torch.Tensor) -> set[int]:
    probs = filtered_probs(logits[None, :], [make_req(params)])[0]
    return set(torch.nonzero(probs).flatten().tolist())


def draw_counts(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    # n requests with seeds 0..n-1 in one batch: n independent draws.
    reqs = [make_req(params, seed=s) for s in range(n)]
    tokens = Sampler()(logits.expand(n, -1).clone(), reqs).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[0]).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0, "drew a token of probability 0"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def test_greedy_is_argmax_whatever_the_other_settings():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 2.9, 1.0]])
    params = SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.5, seed=3)
    reqs = [make_req(params, seed=s) for s in range(2)]
    assert Sampler()(logits, reqs).token_ids == [1, 0]


@pytest.mark.parametrize("t", [1e-6, 1e-30, 1e-38, 1e-44])
def test_a_vanishing_temperature_is_greedy(t):
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0], [0.0, -1.0, 0.5, 0.4]])
    reqs = [make_req(SamplingParams(temperature=t), seed=s) for s in range(2)]
    assert Sampler()(logits, reqs).token_ids == [1, 2]


def test_temperature_distribution_matches_softmax_over_t():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 6000
    counts = draw_counts(logits, SamplingParams(temperature=0.7), n)
    # 5 degrees of freedom: chi2 > 20.5 has p = 0.001. The seeds are fixed, so this is deterministic.
    assert chi_square(counts, torch.softmax(logits / 0.7, -1)) < 20.5
    # ... and the check can tell temperatures apart: the T=1 distribution is rejected.
    assert chi_square(counts, torch.softmax(logits, -1)) > 100


def test_high_temperature_flattens_and_low_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    hot = draw_counts(logits, SamplingParams(temperature=5.0), 3000)
    cold = draw_counts(logits, SamplingParams(temperature=0.05), 3000)
    assert chi_square(hot, torch.softmax(logits / 5.0, -1)) < 13.8  # df 2, p 0.001
    assert cold[0] == 3000  # p(token 0) = 1 - 2e-9


def test_filtered_probs_apply_temperature_exactly():
    logits = torch.tensor([1.0, -0.5, 0.25, 3.0])
    probs = filtered_probs(logits[None], [make_req(SamplingParams(temperature=0.3))])[0]
    torch.testing.assert_close(probs, torch.softmax(logits / 0.3, -1))


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_keeps_exactly_k_candidates(k):
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, -0.2, 1.1, 0.0])
    probs = filtered_probs(logits[None], [make_req(SamplingParams(top_k=k))])[0]
    top = set(logits.topk(k).indices.tolist())
    assert set(torch.nonzero(probs).flatten().tolist()) == top
    # The survivors keep their relative odds (renormalised softmax).
    idx = sorted(top)
    torch.testing.assert_close(probs[idx], torch.softmax(logits[idx], -1))
    counts = draw_counts(logits, SamplingParams(top_k=k), 2000)
    assert set(torch.nonzero(counts).flatten().tolist()) == top  # every one drawn, nothing else


def test_top_k_disabled_by_0_and_minus_1():
    logits = torch.randn(10, generator=torch.Generator().manual_seed(0))
    assert kept(SamplingParams(top_k=0), logits) == set(range(10))
    assert kept(SamplingParams(top_k=-1), logits) == set(range(10))


@pytest.mark.parametrize("top_p, expected", [
    (0.4, {0}),  # the most likely token alone reaches 0.4
    (0.75, {0, 1}),  # 0.5 < 0.75 <= 0.8
    (0.85, {0, 1, 2}),  # 0.8 < 0.85 <= 0.95
    (0.99, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    logits = PROBS.log()
    assert kept(SamplingParams(top_p=top_p), logits) == expected
    # Token order in the vocabulary must not matter: reverse it.
    assert kept(SamplingParams(top_p=top_p), logits.flip(0)) == {3 - i for i in expected}


def test_top_p_per_row_in_a_batch_and_draws_stay_inside():
    logits = PROBS.log()
    reqs = [make_req(SamplingParams(top_p=p)) for p in (0.75, 1.0, 0.4)]
    probs = filtered_probs(logits.expand(3, -1).clone(), reqs)
    assert [set(torch.nonzero(r).flatten().tolist()) for r in probs] == [{0, 1}, {0, 1, 2, 3}, {0}]
    torch.testing.assert_close(probs[0, :2], PROBS[:2] / PROBS[:2].sum())
    torch.testing.assert_close(probs[1], PROBS)  # top_p=1 untouched by its neighbours' top_p
    counts = draw_counts(logits, SamplingParams(top_p=0.75), 3000)
    assert chi_square(counts, torch.tensor([0.625, 0.375, 0, 0])) < 10.8  # df 1, p 0.001


@pytest.mark.parametrize("scale", [3.0, 5.0])
def test_top_p_1_and_top_k_rows_keep_their_whole_set_beside_a_top_p_row(scale):
    # A large vocabulary with a peaked distribution: the float cumsum reaches 1.0 long before
    # the last token. A neighbour's top_p must not cut this row's tail.
    v = 50_000
    logits = torch.randn(3, v, generator=torch.Generator().manual_seed(0)) * scale
    reqs = [make_req(SamplingParams(top_p=1.0)), make_req(SamplingParams(top_k=v - 1)), make_req(SamplingParams(top_p=0.9))]
    probs = filtered_probs(logits, reqs)
    assert int((probs[0] > 0).sum()) == v
    assert int((probs[1] > 0).sum()) == v - 1
    alone = filtered_probs(logits[:1].clone(), reqs[:1])[0]
    torch.testing.assert_close(probs[0], alone)


def test_top_k_then_top_p_on_the_renormalised_top_k():
    # vLLM order: top-k first, then top-p over what is left (renormalised).
    # top_k=2 leaves {0: 0.625, 1: 0.375}; top_p=0.6 then keeps token 0 alone.
    assert kept(SamplingParams(top_k=2, top_p=0.6), PROBS.log()) == {0}
    assert kept(SamplingParams(top_k=3, top_p=0.6), PROBS.log()) == {0, 1}  # 0.5/0.95 < 0.6


@pytest.mark.parametrize("min_p, temperature, expected", [
    (0.0, 1.0, {0, 1, 2, 3}),
    (0.2, 1.0, {0, 1, 2}),  # threshold 0.1
    (0.5, 1.0, {0, 1}),  # threshold 0.25
    (0.7, 1.0, {0}),  # threshold 0.35
    (0.2, 0.5, {0, 1}),  # after temperature 0.5: probs ~ [.69, .25, .06, .007], threshold .14
])
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p, temperature, expected):
    assert kept(SamplingParams(min_p=min_p, temperature=temperature), PROBS.log()) == expected


LOGITS = torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0, 0.0, 1.0, -2.0])
PROMPT, OUTPUT = [1, 2, 6], [2, 3, 3]  # token 6: prompt only; 2: both; 3: output twice


def penalised(params: SamplingParams, logits=LOGITS, prompt=PROMPT, output=OUTPUT) -> torch.Tensor:
    return Sampler()._apply_penalties(logits[None].clone(), [make_req(params, prompt, output)])[0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    got = penalised(SamplingParams(repetition_penalty=2.0))
    expected = LOGITS.clone()
    expected[1] = -2.0  # -1.0 * 2 (prompt)
    expected[2] = 0.25  # 0.5 / 2 (prompt and output)
    expected[3] = -1.0  # -0.5 * 2 (output)
    expected[6] = 0.5  # 1.0 / 2 (prompt only: still penalised)
    torch.testing.assert_close(got, expected)
    # A penalty < 1 rewards repetition the same way round.
    got = penalised(SamplingParams(repetition_penalty=0.5))
    torch.testing.assert_close(got[[1, 2, 3, 6]], torch.tensor([-0.5, 1.0, -0.25, 2.0]))


def test_presence_and_frequency_penalties_subtract_over_output_tokens_only():
    got = penalised(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    expected = LOGITS.clone()
    expected[2] -= 0.5 + 0.25 * 1
    expected[3] -= 0.5 + 0.25 * 2
    torch.testing.assert_close(got, expected)  # prompt-only token 6 untouched
    got = penalised(SamplingParams(presence_penalty=-1.0))  # negative: encourages
    torch.testing.assert_close(got[[2, 3]], LOGITS[[2, 3]] + 1.0)
    got = penalised(SamplingParams(frequency_penalty=1.5), output=[])
    torch.testing.assert_close(got, LOGITS)  # no output yet: nothing to penalise


def test_all_penalties_together_repetition_first():
    got = penalised(SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    expected = penalised(SamplingParams(repetition_penalty=2.0))
    expected[2] -= 0.75
    expected[3] -= 1.0
    torch.testing.assert_close(got, expected)


def test_penalties_apply_per_row():
    reqs = [make_req(SamplingParams(repetition_penalty=2.0), PROMPT, OUTPUT), make_req(SamplingParams(), PROMPT, OUTPUT)]
    got = Sampler()._apply_penalties(LOGITS.expand(2, -1).clone(), reqs)
    torch.testing.assert_close(got[1], LOGITS)
    assert got[0, 2] == 0.25


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[9.0, 8.0, 7.0, 0.0]])  # eos=0 then stop token 1 most likely
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert Sampler()(logits, [make_req(params, output=[3])]).token_ids == [2]
    assert Sampler()(logits, [make_req(params, output=[3, 3])]).token_ids == [0]
    ignore = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert Sampler()(logits, [make_req(ignore, output=[3])]).token_ids == [0]  # EOS is no end here


def test_min_tokens_with_stop_ids_past_the_vocabulary():
    # Such ids can never be sampled; banning them must not fail the step.
    logits = torch.tensor([[9.0, 8.0, 7.0, 0.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1, 100_000])
    assert Sampler()(logits, [make_req(params, output=[3])]).token_ids == [2]


def test_request_stops_on_eos_stop_token_and_max_tokens():
    r = make_req(SamplingParams(max_tokens=5, stop_token_ids=[7]))
    r.append_token(0)
    assert (r.finish_reason, r.stop_reason) == ("stop", None)
    r = make_req(SamplingParams(max_tokens=5, stop_token_ids=[7]))
    r.append_token(7)
    assert (r.finish_reason, r.stop_reason) == ("stop", 7)
    r = make_req(SamplingParams(max_tokens=2, ignore_eos=True))
    r.append_token(0)
    assert not r.finished
    r.append_token(0)
    assert r.finish_reason == "length"


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
              [(1.0, 0, 1.0), (0.5, 5, 1.0), (0, 0, 1.0), (1.3, 0, 0.6), (0.8, 10, 0.9)]]
    together = Sampler()(logits, [make_req(p, seed=10 + i) for i, p in enumerate(params)]).token_ids
    alone = [Sampler()(logits[i:i + 1], [make_req(p, seed=10 + i)]).token_ids[0] for i, p in enumerate(params)]
    assert together == alone


def test_logprobs_unit_chosen_plus_top_k_with_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    lp = torch.log_softmax(logits[0], -1)
    res = Sampler()(logits, [make_req(SamplingParams(temperature=0, logprobs=2, repetition_penalty=5.0),
                                      prompt=[1])])
    # The penalty moves the choice to token 2, but logprobs stay the model's raw ones.
    assert res.token_ids == [2]
    d = res.logprobs[0]
    assert set(d) == {1, 2}
    assert (d[1].rank, d[2].rank) == (1, 2)
    assert d[1].logprob == pytest.approx(float(lp[1])) and d[2].logprob == pytest.approx(float(lp[2]))
    res = Sampler()(logits, [make_req(SamplingParams(temperature=0, logprobs=0, top_k=1), prompt=[4])])
    assert list(res.logprobs[0]) == [1] and res.logprobs[0][1].rank == 1
    res = Sampler()(logits, [make_req(SamplingParams(temperature=0, logprobs=1, repetition_penalty=50.0), prompt=[1, 2])])
    d = res.logprobs[0]  # chosen token 0 (rank 3) plus the top 1
    assert res.token_ids == [0] and set(d) == {0, 1} and d[0].rank == 3 and d[1].rank == 1


def test_logprobs_larger_than_the_vocabulary_returns_the_whole_vocabulary():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    res = Sampler()(logits, [make_req(SamplingParams(temperature=0, logprobs=10))])
    assert {t: v.rank for t, v in res.logprobs[0].items()} == {1: 1, 2: 2, 0: 3}
