"""Sampling: the Sampler on hand-made logits, and SamplingParams end to end through `LLM` on a
tiny random Llama, checked against transformers' logits."""
from __future__ import annotations

import pytest
import torch

from r1serve import SamplingParams
from r1serve.engine.request import Request
from r1serve.engine.sampler import Sampler, _filtered_probs
from r1serve.outputs import CompletionOutput


pytestmark = pytest.mark.usefixtures("one_thread")

# ---- unit level: Sampler on hand-made logits -----------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])  # sorted, so kept sets are prefixes


def make_req(params: SamplingParams, prompt=(1,), output=(), seed=0, eos=(0,)) -> Request:
    r = Request("r", list(prompt), params, frozenset(eos), 1024, torch.Generator().manual_seed(seed))
    r.token_ids.extend(output)
    return r


def kept(params: SamplingParams, logits: torch.Tensor) -> set[int]:
    probs = _filtered_probs(logits[None, :], [make_req(params)])[0]
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
    probs = _filtered_probs(logits[None], [make_req(SamplingParams(temperature=0.3))])[0]
    torch.testing.assert_close(probs, torch.softmax(logits / 0.3, -1))


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_keeps_exactly_k_candidates(k):
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, -0.2, 1.1, 0.0])
    probs = _filtered_probs(logits[None], [make_req(SamplingParams(top_k=k))])[0]
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
    probs = _filtered_probs(logits.expand(3, -1).clone(), reqs)
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
    probs = _filtered_probs(logits, reqs)
    assert int((probs[0] > 0).sum()) == v
    assert int((probs[1] > 0).sum()) == v - 1
    alone = _filtered_probs(logits[:1].clone(), reqs[:1])[0]
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


# ---- end to end through LLM on a tiny random Llama -------------------------------------------------

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7]
FFFD = "\ufffd"




@pytest.fixture(scope="module")
def hf(tiny):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished_requests()
        assert engine.kv.pool.num_free == engine.num_kv_blocks


def hf_step_logits(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """(len(output), V): the reference logits each output token was chosen from."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(output)]


def gen(llm, prompt, **kw) -> CompletionOutput:
    return llm.generate([{"prompt_token_ids": prompt}], SamplingParams(**kw))[0].outputs[0]


def test_greedy_and_logprobs_match_transformers(llm, hf):
    out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    assert len(out.token_ids) == 8 and len(out.logprobs) == 8
    ref = torch.log_softmax(hf_step_logits(hf, PROMPT_IDS, out.token_ids), -1)
    tok = llm.get_tokenizer()
    for step, (token, d) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[step]
        assert token == int(row.argmax()), f"step {step}: not the greedy token"
        top = row.topk(3)
        assert set(d) == {token} | set(top.indices.tolist())  # chosen is rank 1 here, so 3 entries
        for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            assert d[t].rank == rank
            assert d[t].logprob == pytest.approx(v, abs=1e-4)
            assert d[t].decoded_token == tok.decode([t])


def test_logprobs_0_gives_only_the_chosen_token_with_its_true_rank(llm, hf):
    out = gen(llm, PROMPT_IDS, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=0)
    ref = torch.log_softmax(hf_step_logits(hf, PROMPT_IDS, out.token_ids), -1)
    assert [list(d) for d in out.logprobs] == [[t] for t in out.token_ids]
    for step, (token, d) in enumerate(zip(out.token_ids, out.logprobs)):
        assert d[token].logprob == pytest.approx(float(ref[step, token]), abs=1e-4)
        assert d[token].rank == int((ref[step] > ref[step, token]).sum()) + 1
    assert any(d[t].rank > 1 for t, d in zip(out.token_ids, out.logprobs)), "sampling never left the argmax"


def test_no_logprobs_by_default(llm):
    assert gen(llm, PROMPT_IDS, max_tokens=3).logprobs is None


@pytest.mark.parametrize("penalties", [
    dict(repetition_penalty=1.8),
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(repetition_penalty=0.6, frequency_penalty=-0.5),
], ids=["repetition", "presence", "frequency", "mixed"])
def test_greedy_with_penalties_matches_penalised_reference_logits(llm, hf, penalties):
    n = 16
    out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=n, ignore_eos=True, **penalties)
    plain = gen(llm, PROMPT_IDS, temperature=0, max_tokens=n, ignore_eos=True)
    assert out.token_ids != plain.token_ids, "these penalties should change this greedy run"
    ref = hf_step_logits(hf, PROMPT_IDS, out.token_ids)
    rep = penalties.get("repetition_penalty", 1.0)
    for step, token in enumerate(out.token_ids):
        row = ref[step].clone()
        seen = sorted(set(PROMPT_IDS + out.token_ids[:step]))
        row[seen] = torch.where(row[seen] > 0, row[seen] / rep, row[seen] * rep)
        counts = torch.bincount(torch.tensor(out.token_ids[:step], dtype=torch.long), minlength=row.numel()).float()
        row -= penalties.get("frequency_penalty", 0.0) * counts + penalties.get("presence_penalty", 0.0) * (counts > 0)
        assert float(row[token]) >= float(row.max()) - 1e-4, f"step {step}: {token} is not the penalised argmax"


def test_same_seed_same_output_alone_or_batched(llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": PROMPT_IDS}], sp)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              sp,
              SamplingParams(temperature=1.2, top_p=0.9, max_tokens=14, ignore_eos=True)]
    prompts = [{"prompt_token_ids": p} for p in ([11, 12], list(range(40, 77)), PROMPT_IDS, [300, 1, 2])]
    batched = llm.generate(prompts, others)
    assert batched[2].outputs[0].token_ids == alone
    again = llm.generate([{"prompt_token_ids": PROMPT_IDS}], sp)[0].outputs[0].token_ids
    assert again == alone
    other_seed = gen(llm, PROMPT_IDS, temperature=1.0, seed=1235, max_tokens=12, ignore_eos=True).token_ids
    assert other_seed != alone


def test_unseeded_requests_differ(llm):
    a, b = llm.generate([{"prompt_token_ids": PROMPT_IDS}] * 2, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
    assert a.outputs[0].token_ids != b.outputs[0].token_ids


def test_n_completions_use_seed_plus_i(llm):
    out = llm.generate([{"prompt_token_ids": PROMPT_IDS}], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    assert len(out) == 1 and out[0].finished
    comps = out[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in comps)
    for i, c in enumerate(comps):
        single = gen(llm, PROMPT_IDS, temperature=1.0, seed=7 + i, max_tokens=10, ignore_eos=True)
        assert c.token_ids == single.token_ids and c.text == single.text
    assert len({tuple(c.token_ids) for c in comps}) == 3


def test_n_greedy_completions_are_identical(llm):
    comps = llm.generate([{"prompt_token_ids": PROMPT_IDS}], SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True))[0].outputs
    assert len(comps) == 2 and comps[0].token_ids == comps[1].token_ids


def test_max_tokens(llm):
    for m in (1, 5):
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=m, ignore_eos=True)
        assert len(out.token_ids) == m and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_ids_end_the_output_at_the_first_occurrence(llm):
    plain = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, ignore_eos=True).token_ids
    stop = plain[3]
    cut = plain.index(stop)
    out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop, 100000])
    assert out.token_ids == plain[:cut + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_eos_stops_and_min_tokens_suppresses_it(llm):
    engine = llm.engine
    plain = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, ignore_eos=True).token_ids
    eos = plain[2]
    first = plain.index(eos)
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({eos})  # as if the model's EOS were this token
    try:
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12)
        assert out.token_ids == plain[:first + 1] and (out.finish_reason, out.stop_reason) == ("stop", None)
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, ignore_eos=True)
        assert out.token_ids == plain and out.finish_reason == "length"
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, min_tokens=first + 3)
        assert len(out.token_ids) >= first + 3
        assert eos not in out.token_ids[:first + 3]
        assert out.token_ids[:first] == plain[:first]  # nothing changes before EOS would come
        assert out.finish_reason == "length" or out.token_ids[-1] == eos
    finally:
        engine.eos_token_ids = saved


def ascii_run(llm) -> tuple[list[int], str]:
    """A prompt whose greedy text is long and readable, so stop strings can be cut from it."""
    for p in (PROMPT_IDS, [11, 12], list(range(40, 60)), [300, 1, 2], [7, 7, 7, 7]):
        out = gen(llm, p, temperature=0, max_tokens=24, ignore_eos=True)
        if len(out.text) >= 12 and "\ufffd" not in out.text[:12]:
            return p, out.text
    pytest.fail("no prompt gave readable text")


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_never_in_text_unless_asked(llm, include):
    prompt, text = ascii_run(llm)
    stop = text[5:8]
    idx = text.find(stop)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"],
                        include_stop_str_in_output=include)
    out = llm.generate([{"prompt_token_ids": prompt}], sp)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == (text[:idx + len(stop)] if include else text[:idx])
    assert len(out.token_ids) < 24
    # Streamed: every partial text is a prefix of the final one and never shows the stop string.
    seen = []
    for partial in llm.stream({"prompt_token_ids": prompt}, sp):
        seen.append(partial.outputs[0].text)
    assert seen[-1] == out.text
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)
    if not include:
        assert all(stop not in s for s in seen)


def test_stop_string_completed_by_the_last_allowed_token_reports_stop(llm):
    prompt, _ = ascii_run(llm)
    ids = gen(llm, prompt, temperature=0, max_tokens=24, ignore_eos=True).token_ids
    tok = llm.get_tokenizer()
    for m in range(2, 25):  # a 2-char stop string that the m-th token completes
        text = tok.decode(ids[:m])
        stop = text[-2:]
        if FFFD not in text and len(stop) == 2 and stop not in tok.decode(ids[:m - 1]):
            break
    else:
        pytest.fail("no suitable stop string")
    out = gen(llm, prompt, temperature=0, max_tokens=m, ignore_eos=True, stop=[stop])
    assert out.text == text[:-2] and len(out.token_ids) == m
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_min_tokens_holds_back_stop_strings_too(llm):
    prompt, _ = ascii_run(llm)
    ids = gen(llm, prompt, temperature=0, max_tokens=24, ignore_eos=True).token_ids
    tok = llm.get_tokenizer()
    early = tok.decode(ids[:2])
    stop = early[-1]  # completed by token 2 at the latest
    out = gen(llm, prompt, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and len(out.token_ids) <= 2
    out = gen(llm, prompt, temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=6)
    assert len(out.token_ids) >= 6 and out.text.startswith(early)


def test_stop_string_as_plain_str(llm):
    prompt, text = ascii_run(llm)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=24, stop=text[6]))[0].outputs[0]
    assert out.text == text[:text.find(text[6])] and out.stop_reason == text[6]


def test_text_prompt_and_chat(llm):
    out = llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.prompt == "Hello, my name is" and out.prompt_token_ids == llm.get_tokenizer().encode("Hello, my name is")
    chat = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert chat.prompt.startswith("<|im_start|>user\nHi<|im_end|>") and len(chat.outputs[0].token_ids) == 4


def test_temperature_end_to_end_first_token_distribution(llm, hf):
    # First-token draws over many seeds follow softmax(logits / T) of the reference model.
    t, n = 1.5, 600
    sps = [SamplingParams(temperature=t, seed=s, max_tokens=1, top_k=4) for s in range(n)]
    outs = llm.generate([{"prompt_token_ids": PROMPT_IDS}] * n, sps)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outs]), minlength=hf.config.vocab_size)
    ref = hf_step_logits(hf, PROMPT_IDS, [0])[0] / t
    top = ref.topk(4).indices
    probs = torch.zeros_like(ref)
    probs[top] = torch.softmax(ref[top], -1)
    assert chi_square(counts.double(), probs) < 16.3  # df 3, p 0.001
    assert int(counts[top].sum()) == n  # nothing outside the top 4
