"""Constrained decoding in the engine: every kind of constraint holds on a tiny random model
(which left alone writes noise), constrained requests leave their unconstrained batch-mates
exactly as they were, reasoning stays free, and bad grammars are refused before any work."""
from __future__ import annotations

import json
import re

import pytest

from r1serve import SamplingParams, StructuredOutputsParams
from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3
from r1serve.errors import InvalidRequestError
from r1serve.sampling_params import ReasoningSpec

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "enum": ["Ada", "Bob"]},
                                           "admin": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
          "required": ["name", "admin", "tags"], "additionalProperties": False}


def constrained(**kind) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=7, max_tokens=120, structured_outputs=StructuredOutputsParams(**kind))


def text_of(llm, prompt, params) -> str:
    out = llm.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "stop", out  # the grammar completed: nothing but the end could follow
    return out.text


def test_every_kind_of_constraint_holds(llm, one_thread):
    # (json_object is left to SmolLM2 in test_tool_calls_server.py: any object lets a random
    # model write keys until max_tokens.)
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120, structured_outputs={"json": SCHEMA})
        value = json.loads(text_of(llm, "Hello", params))
        assert value["name"] in ("Ada", "Bob") and isinstance(value["admin"], bool) and len(value["tags"]) <= 2
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", text_of(llm, "Hello", constrained(regex=r"[a-c]{3}-\d{2}")))
    assert text_of(llm, "Hello", constrained(choice=["alpha", "beta gamma"])) in ("alpha", "beta gamma")
    assert re.fullmatch(r"(yes|no) thanks", text_of(llm, "Hi", constrained(grammar='start: ("yes" | "no") " thanks"')))
    assert re.fullmatch(r"a[0-9]{1,2}z", text_of(llm, "Hi", constrained(grammar='root ::= "a" [0-9] [0-9]? "z"')))


def test_n_choices_each_follow_the_grammar(llm, one_thread):
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(choice=["red", "green", "blue"]))
    outs = llm.generate(["Pick"], params)[0].outputs
    assert len(outs) == 3 and all(o.text in ("red", "green", "blue") for o in outs)


def test_constrained_neighbours_do_not_change_an_unconstrained_request(llm, one_thread):
    free = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    neighbour = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    prompts = ["The quick brown", "Hello, my name", "Paged attention keeps"]
    plain = llm.generate(prompts, [free, neighbour, neighbour])[0].outputs[0]
    mixed = llm.generate(prompts, [free, constrained(regex="[a-z ]{1,40}"), constrained(json=SCHEMA)])[0].outputs[0]
    alone = llm.generate(prompts[:1], free)[0].outputs[0]
    assert plain.token_ids == mixed.token_ids == alone.token_ids
    for a, b in zip(plain.logprobs, mixed.logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks  # nothing leaked


def test_logit_bias_bans_and_is_checked(llm, one_thread):
    greedy = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    banned = {greedy.token_ids[0]: -100.0}
    biased = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                     logit_bias=banned))[0].outputs[0]
    assert greedy.token_ids[0] not in biased.token_ids
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate(["Hello"], SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={1: 500.0})


def test_bad_constraints_are_refused_before_any_work(llm):
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()
    for bad in ({"regex": "a(("}, {"json": {"type": "nonsense"}}, {"json": "{not json"}, {"grammar": "start: nope"}):
        with pytest.raises(InvalidRequestError, match="does not compile|not a JSON schema"):
            llm.generate(["Hi"], SamplingParams(structured_outputs=bad))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    from r1serve import LLM

    path = write_deepseek_v3(tmp_path_factory.mktemp("r1"), DEEPSEEK_V3_TINY, r1_tokenizer=True)
    return LLM(model=str(path), dtype="float32", num_kv_blocks=64, block_size=8)


def _spec(llm, open_at_start: bool, budget: int) -> ReasoningSpec:
    tok = llm.get_tokenizer()
    return ReasoningSpec((tok.token_to_id("<think>"),), (tok.token_to_id("</think>"),), open_at_start, budget)


def test_reasoning_stays_free_and_the_answer_follows_the_grammar(r1, one_thread):
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=150, reasoning=_spec(r1, True, 6),
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    out = r1.generate(["Hi<｜Assistant｜><think>\n"], params)[0].outputs[0]
    thought, answer = out.text.split("</think>")
    assert out.num_reasoning_tokens == 7 and json.loads(answer)["name"] in ("Ada", "Bob")


def test_an_output_that_may_still_open_its_reasoning(r1, one_thread):
    think = r1.get_tokenizer().token_to_id("<think>")
    # Pushed to open it: the mask lets the start marker through, the thinking is free, the
    # budget closes it, and then the grammar holds.
    opened = SamplingParams(temperature=0, max_tokens=150, reasoning=_spec(r1, False, 3), logit_bias={think: 50.0},
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    out = r1.generate(["Hi"], opened)[0].outputs[0]
    assert out.text.startswith("<think>") and out.text.split("</think>")[1] in ("yes", "no")
    # Kept from it: the answer starts at once, constrained from its first token.
    closed = SamplingParams(temperature=0, max_tokens=150, reasoning=_spec(r1, False, 3), logit_bias={think: -100.0},
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    out = r1.generate(["Hi"], closed)[0].outputs[0]
    assert out.text in ("yes", "no") and out.num_reasoning_tokens == 0


def test_bitmask_applies_to_its_rows_only():
    import torch

    from r1serve.engine.grammar import allow, apply_token_bitmask

    torch.manual_seed(0)
    logits, vocab = torch.randn(4, 70), 70
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32)
    allow(bitmask[1], 69)  # the last token, in the last, partial word
    out = logits.clone()
    apply_token_bitmask(out, [1, 3], bitmask)
    for row, r in ((1, 0), (3, 1)):
        for t in range(vocab):
            allowed = (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if allowed else float("-inf"))
    assert out[1].isfinite().any() and out[3, 69] == logits[3, 69]
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
