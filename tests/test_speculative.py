"""Speculative decoding: lossless and exact.

Greedy output is the same tokens with n-gram drafts as without (tiny Llama and the real
SmolLM2), batched, over prefix-cache hits, chunked prefill, preemption and tensor
parallelism, with no KV block left behind; sampled output keeps its distribution
(chi-square against the exact one) and a seeded request its tokens; every stop inside an
accepted run lands where it would without drafts; the counters count what was drafted and
accepted; the policy plans by measured step costs; the server and the benchmarks report it.
DeepSeek's MTP drafter: test_deepseek_mtp.py.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from r1serve import LLM, SamplingParams, StructuredOutputsParams
from r1serve.engine.drafter import Drafter
from r1serve.engine.speculation import Speculation, StepCosts, plan_drafts
from r1serve.sampling_params import ReasoningSpec

from spec_runs import GREEDY, PROMPTS, REPEAT, assert_idle, make, outputs, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain(tiny) -> LLM:
    return make(tiny)


@pytest.fixture(scope="module")
def ngram(tiny) -> LLM:
    return make(tiny, "ngram")


# ---- greedy: the same tokens ---------------------------------------------------------------------


def test_ngram_greedy_is_identical_batched_and_over_prefix_hits(plain, ngram):
    want = token_ids(plain, PROMPTS)
    before = ngram.engine.stats()
    assert token_ids(ngram, PROMPTS) == want
    hits = ngram.engine.stats().prefix_cache_hits
    assert token_ids(ngram, PROMPTS) == want  # again: the prompts now hit the prefix cache
    after = ngram.engine.stats()
    assert after.prefix_cache_hits > hits
    assert after.spec_num_accepted_tokens - before.spec_num_accepted_tokens > 20
    assert_idle(ngram)


@pytest.mark.parametrize("opts", [dict(enable_chunked_prefill=True, max_num_batched_tokens=8),
                                  dict(num_kv_blocks=12), dict(num_speculative_tokens=1),
                                  dict(tensor_parallel_size=2)],
                         ids=["chunked-prefill", "preemption", "k1", "tensor-parallel"])
def test_ngram_greedy_is_identical_under_pressure(tiny, plain, opts):
    llm = make(tiny, "ngram", **opts)
    prompts = PROMPTS[:3] if "num_kv_blocks" in opts else PROMPTS
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [r.outputs[0].token_ids for r in results] == token_ids(plain, prompts)
    if "num_kv_blocks" in opts:
        assert sum(r.metrics["num_preemptions"] for r in results) > 0
    assert llm.engine.stats().spec_num_accepted_tokens > 0
    assert_idle(llm)
    llm.close()


def test_smollm2_quoting_is_identical_and_mostly_accepted(smollm2_gguf):
    text = ("Paged attention keeps the KV cache in fixed-size blocks, so that a request grows one block at a "
            "time and a finished request gives its blocks back at once.")
    messages = [{"role": "user", "content": f"Repeat this sentence exactly, twice:\n\n{text}"}]
    params = SamplingParams(temperature=0, max_tokens=80)
    want = LLM(str(smollm2_gguf)).chat([messages], params)[0].outputs[0]
    llm = LLM(str(smollm2_gguf), speculative="ngram", num_speculative_tokens=4)
    got = llm.chat([messages], params)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    stats = llm.engine.stats()
    assert stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens > 0.5
    assert_idle(llm)


# ---- every stop inside an accepted run -----------------------------------------------------------


def _loop_prompt(plain) -> list[int]:
    """REPEAT and the tiny model's own first 24 tokens after it: from there it loops (period
    8, with one detour), so prompt lookup drafts runs that are accepted and one that is not."""
    return REPEAT + token_ids(plain, [REPEAT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]


def _stop_cases(plain, prompt) -> dict[str, SamplingParams]:
    tok = token_ids(plain, [prompt])[0]
    piece = plain.get_tokenizer().decode(tok[9:11])
    return {
        "max_tokens": SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        "stop_token": SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[tok[3]]),
        "min_tokens": SamplingParams(temperature=0, max_tokens=40, min_tokens=12, stop_token_ids=[tok[3]]),
        "stop_string": SamplingParams(temperature=0, max_tokens=40, stop=[piece], ignore_eos=True),
        "stop_string_kept": SamplingParams(temperature=0, max_tokens=40, stop=[piece], include_stop_str_in_output=True,
                                           ignore_eos=True),
        "reasoning_budget": SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                           reasoning=ReasoningSpec((11,), (7, 8), open_at_start=True, max_tokens=12)),
        "penalties_logprobs": SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3,
                                             presence_penalty=0.4, logit_bias={260: 2.0}, logprobs=3),
    }


@pytest.mark.parametrize("case", ["max_tokens", "stop_token", "min_tokens", "stop_string", "stop_string_kept",
                                  "reasoning_budget", "penalties_logprobs"])
def test_stops_and_processing_inside_accepted_runs(plain, ngram, case):
    prompt = _loop_prompt(plain)
    params = _stop_cases(plain, prompt)[case]
    want = outputs(plain, [prompt], params)[0][0]
    before = ngram.engine.stats().spec_num_accepted_tokens
    got = outputs(ngram, [prompt], params)[0][0]
    assert (got.token_ids, got.text, got.finish_reason, got.stop_reason, got.num_reasoning_tokens) == \
        (want.token_ids, want.text, want.finish_reason, want.stop_reason, want.num_reasoning_tokens)
    if params.logprobs:
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    assert ngram.engine.stats().spec_num_accepted_tokens > before  # the run did go through drafts
    assert_idle(ngram)


def test_n_greedy_children_and_aborts(ngram, plain):
    params = SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True)
    want = token_ids(plain, [REPEAT])[0][:20]
    assert [c.token_ids for c in outputs(ngram, [REPEAT], params)[0]] == [want] * 3
    engine = ngram.engine
    engine.add_request("gone", {"prompt_token_ids": REPEAT}, SamplingParams(temperature=0, max_tokens=200,
                                                                            ignore_eos=True))
    for _ in range(6):
        engine.step()
    engine.abort_request("gone")
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(ngram)


def test_structured_output_drafts_pass_through_the_grammar(plain, ngram):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["abc", "abd"]},
                                                        "minItems": 6, "maxItems": 6}},
              "required": ["tags"], "additionalProperties": False}
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs=StructuredOutputsParams(json=schema))
    want = outputs(plain, [REPEAT], params)[0][0]
    before = ngram.engine.stats().spec_num_accepted_tokens
    got = outputs(ngram, [REPEAT], params)[0][0]
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert len(json.loads(got.text)["tags"]) == 6
    assert ngram.engine.stats().spec_num_accepted_tokens > before
    assert_idle(ngram)


# ---- sampling: the same distribution --------------------------------------------------------------


class CyclingDrafter(Drafter):
    """Drafts from a few candidates in turn: right at some positions, wrong at others, so
    both the acceptance and the residual draw are exercised."""

    def __init__(self, candidates: list[int]) -> None:
        self.candidates, self.calls = candidates, 0

    def propose(self, requests, ks):
        out = []
        for k in ks:
            self.calls += 1
            out.append([self.candidates[(self.calls + j) % len(self.candidates)] for j in range(k)])
        return out


def _exact_pairs(plain: LLM, prompt: list[int], temperature: float, top_k: int) -> dict[tuple[int, int], float]:
    """P(t1, t2) under temperature and top-k, from the model's raw logprobs."""
    def dist(p):
        lp = plain.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=1, logprobs=top_k))[0]
        ranked = sorted(lp.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1].logprob)[:top_k]
        top = {t: v.logprob / temperature for t, v in ranked}
        z = math.log(sum(math.exp(v) for v in top.values()))
        return {t: math.exp(v - z) for t, v in top.items()}
    first = dist(prompt)
    return {(a, b): pa * pb for a, pa in first.items() for b, pb in dist(prompt + [a]).items()}


def _chi_square_p(observed: Counter, expected: dict, n: int) -> float:
    stat = sum((observed.get(cell, 0) - n * p) ** 2 / (n * p) for cell, p in expected.items())
    assert sum(observed.values()) == sum(observed.get(c, 0) for c in expected)  # no sample off the support
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_sampling_keeps_the_distribution(tiny, plain):
    temperature, top_k, n = 1.5, 3, 900
    exact = _exact_pairs(plain, REPEAT, temperature, top_k)
    llm = make(tiny, "ngram", num_speculative_tokens=2, speculative_max_rows=4096, max_num_seqs=512)
    second = Counter()
    for (_, b), p in exact.items():
        second[b] += p
    candidates = [b for b, _ in second.most_common(3)]
    llm.engine.speculation = Speculation(llm.engine.config, CyclingDrafter(candidates), adaptive=False)
    params = [SamplingParams(temperature=temperature, top_k=top_k, max_tokens=3, seed=s, ignore_eos=True)
              for s in range(n)]
    results = llm.generate([{"prompt_token_ids": REPEAT}] * n, params)
    pairs = Counter(tuple(r.outputs[0].token_ids[:2]) for r in results)
    stats = llm.engine.stats()
    assert stats.spec_num_drafts >= n  # the second token of every sample went through verification
    assert 0.1 < stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens < 0.9  # both outcomes, often
    assert _chi_square_p(pairs, exact, n) > 1e-3
    assert_idle(llm)


def test_a_seeded_request_gives_the_same_tokens_with_or_without_drafts(plain, ngram):
    prompt = _loop_prompt(plain)
    before = ngram.engine.stats().spec_num_accepted_tokens
    for params in [SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, max_tokens=30, seed=11, ignore_eos=True),
                   SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.1, max_tokens=30, seed=3,
                                  ignore_eos=True, n=2)]:
        want = [c.token_ids for c in outputs(plain, [prompt], params)[0]]
        assert [c.token_ids for c in outputs(ngram, [prompt], params)[0]] == want
    assert ngram.engine.stats().spec_num_accepted_tokens > before


# ---- counters ----------------------------------------------------------------------------------


class ScriptedDrafter(Drafter):
    """Knows the greedy continuation: drafts two right tokens, then wrong ones."""

    def __init__(self, answer: list[int], prompt_len: int) -> None:
        self.answer, self.prompt_len = answer, prompt_len
        self.drafted = self.expected_accepted = self.verifications = 0

    def propose(self, requests, ks):
        out = []
        for req, k in zip(requests, ks):
            at = req.num_tokens - self.prompt_len
            right = self.answer[at:at + min(k, 2)]
            wrong = [(t + 1) % 384 for t in self.answer[at + len(right):at + k]]
            out.append(right + wrong)
            if k:
                self.verifications += 1
                self.drafted += k
                self.expected_accepted += len(right)
        return out


def test_counters_count_what_was_drafted_and_accepted(tiny, plain):
    answer = token_ids(plain, [REPEAT], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    llm = make(tiny, "ngram", num_speculative_tokens=3)
    drafter = ScriptedDrafter(answer, len(REPEAT))
    llm.engine.speculation.drafter = drafter
    got = token_ids(llm, [REPEAT], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    assert got == answer
    s = llm.engine.stats()
    assert (s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens) == \
        (drafter.verifications, drafter.drafted, drafter.expected_accepted)
    assert s.spec_accepted_per_position[2:] in ((), (0,))  # the third draft is always wrong
    assert s.spec_accepted_per_position[0] == s.spec_num_drafts


# ---- the policy -----------------------------------------------------------------------------------


def test_the_plan_drafts_while_the_step_gains_tokens_per_unit_of_cost():
    flat = [0.0] + [1.0] * 16  # extra rows cost nothing: everyone drafts to its cap
    assert plan_drafts([0.9, 0.9], [4, 3], flat) == [4, 3]
    assert sum(plan_drafts([0.9] * 10, [4] * 10, flat)) == 6  # 16 rows at most
    linear = [0.0] + [1 + 0.1 * (r - 1) for r in range(1, 17)]
    assert plan_drafts([0.5], [4], linear) == [2]  # (1 + .5 + .25) / 1.2 beats 1.5 / 1.1 and 1.875 / 1.3
    assert plan_drafts([0.05], [4], linear) == [0]
    assert plan_drafts([0.9, 0.2], [4, 4], linear) == [4, 0]  # the likely guesses first
    steep = [0.0] + [float(r) for r in range(1, 17)]  # a row costs a whole step: drafting never pays
    assert plan_drafts([0.99, 0.99], [4, 4], steep) == [0, 0]


def test_step_costs_are_measured_and_priced_from_below_where_unseen():
    costs = StepCosts(8)
    assert costs.costs()[1:4] == pytest.approx([1.0, 1.1, 1.2])
    costs.observe(1, 0.010)
    costs.observe(3, 0.016)
    got = costs.costs()
    assert got[1] == 0.010 and got[3] == 0.016
    assert got[2] == pytest.approx(0.011)  # from 1 row at +10% a row
    assert got[5] == pytest.approx(0.016 + 2 * 0.003)  # at the slope from 1 to 3 rows, 3 ms a row
    costs.observe(4, 0.001)  # noise below a smaller count's cost: never priced cheaper than it
    assert costs.costs()[4] == 0.016


# ---- through the server -------------------------------------------------------------------------


def test_server_streams_the_same_text_and_exports_the_counters(tiny, plain, tmp_path):
    import httpx

    from r1serve.bench.server_counters import read_spec_counters
    from server_process import ServerProcess

    prompt = _loop_prompt(plain)
    want = outputs(plain, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0][0].text
    server = ServerProcess([str(tiny), "--served-model-name", "tiny", "--speculative", "ngram", "--prompt-lookup-min",
                            "1", "--threads", "1"], tmp_path / "server.log")
    try:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        whole = httpx.post(f"{server.base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        streamed = ""
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body | {"stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed += "".join(c["text"] for c in json.loads(line[6:])["choices"])
        assert whole == streamed == want
        server.wait_idle()
        counters = read_spec_counters(server.base + "/v1", {})
        assert counters.num_drafts > 0 and 0 < counters.num_accepted_tokens <= counters.num_draft_tokens
        rate = server.metric("r1serve:spec_decode_acceptance_rate")
        assert rate == pytest.approx(counters.num_accepted_tokens / counters.num_draft_tokens)
        assert server.metric("r1serve:spec_decode_num_accepted_tokens_per_pos_total") == counters.num_accepted_tokens
        assert server.metric("r1serve:spec_decode_num_accepted_tokens_per_pos_total", position="0") > 0
    finally:
        server.stop()


def test_bench_speculative_reports_speed_acceptance_and_equality(tiny, tmp_path, capsys):
    from r1serve.cli import main

    out = tmp_path / "spec.json"
    assert main(["bench", "speculative", "--model", str(tiny), "--concurrency", "1,2", "--rounds", "1",
                 "--output-len", "12", "--draft-sweep", "1,2", "--dtype", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["workload"], r["concurrency"]) for r in result["rows"]] == [("quote", 1), ("quote", 2), ("chat", 1),
                                                                         ("chat", 2)]
    assert set(result["step_cost_by_drafts"]) == {"0", "1", "2"}
    assert all(r["same_tokens"] == 1.0 for r in result["rows"])  # float32: exactly plain's tokens
    assert "tok/verify" in capsys.readouterr().out


def test_bench_serve_reports_the_acceptance():
    from r1serve.bench.serve_report import summarize, table
    from r1serve.engine.spec_decode_stats import SpecDecodeStats

    level = summarize("concurrency 1", [], 1.0, None, None, SpecDecodeStats(10, 40, 30))
    assert level.spec_decode["acceptance_rate"] == 0.75 and level.spec_decode["mean_accepted_length"] == 4.0
    assert "75% of 40 drafted tokens accepted, 4.00 tokens per verification" in table([level])
    assert summarize("concurrency 1", [], 1.0, None, None, None).spec_decode is None
