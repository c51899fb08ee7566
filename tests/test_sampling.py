"""SamplingParams end to end through `LLM` on a tiny random Llama, checked against
transformers' logits (the Sampler alone is in test_sampler.py)."""
from __future__ import annotations

import pytest
import torch

from r1serve import SamplingParams
from r1serve.outputs import CompletionOutput

from test_sampler import chi_square

pytestmark = pytest.mark.usefixtures("one_thread")

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


def greedy_with_eos_held_back(hf, prompt: list[int], eos: int, min_tokens: int, max_tokens: int) -> list[int]:
    """What min_tokens promises, on the reference logits: EOS cannot be drawn while the output
    is shorter than min_tokens, and ends the output once it is drawn after that."""
    out: list[int] = []
    while len(out) < max_tokens:
        with torch.no_grad():
            row = hf(torch.tensor([prompt + out])).logits[0, -1]
        if len(out) < min_tokens:
            row[eos] = float("-inf")
        out.append(int(row.argmax()))
        if out[-1] == eos:
            break
    return out


def test_eos_stops_and_min_tokens_suppresses_it(llm, hf):
    engine = llm.engine
    plain = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, ignore_eos=True).token_ids
    eos = plain[2]
    first = plain.index(eos)
    saved = engine.inputs.eos_token_ids
    engine.inputs.eos_token_ids = frozenset({eos})  # as if the model's EOS were this token
    try:
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12)
        assert out.token_ids == plain[:first + 1] and (out.finish_reason, out.stop_reason) == ("stop", None)
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=12, ignore_eos=True)
        assert out.token_ids == plain and out.finish_reason == "length"
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=16, min_tokens=first + 3)
        held = greedy_with_eos_held_back(hf, PROMPT_IDS, eos, first + 3, 16)
        # This run draws EOS again once min_tokens allows it, before max_tokens: both halves of
        # the promise show, and the finish reason can only be EOS's.
        assert eos not in held[:first + 3] and held[-1] == eos and len(held) < 16
        assert out.token_ids == held and (out.finish_reason, out.stop_reason) == ("stop", None)
        # At the edge: EOS may come right after the min_tokens-th token, and not one token sooner.
        last = len(held) - 1
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=16, min_tokens=last)
        assert out.token_ids == held and out.finish_reason == "stop"
        out = gen(llm, PROMPT_IDS, temperature=0, max_tokens=16, min_tokens=last + 1)
        assert out.token_ids == greedy_with_eos_held_back(hf, PROMPT_IDS, eos, last + 1, 16)
        assert out.token_ids[last] != eos
    finally:
        engine.inputs.eos_token_ids = saved


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
