"""The thinking switch, effort, and reasoning carried through a tool loop: the prompt each
request renders (against transformers' rendering of the same template), and a real server
on a tiny model with R1's tokens, driven by the openai SDK."""
from __future__ import annotations

import json
from types import SimpleNamespace

import openai
import pytest

from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, HERMES_CHAT_TEMPLATE, write_deepseek_v3, write_tokenizer
from r1serve.server.protocol import ChatCompletionRequest
from r1serve.server.serving_chat import chat_prompt, reasoning_spec
from r1serve.server.thinking import Thinking
from r1serve.tokenizer.tokenizer import Tokenizer
from r1serve.tool_calls import detect_format

from server_process import ServerProcess

# A ChatML template in Qwen3's manner: `enable_thinking` switches thinking, and every
# assistant turn's reasoning_content is rendered in a think block (which turns keep theirs is
# r1serve's rule, tested here, not the template's).
SWITCHED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m['reasoning_content'] %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n"
    "{% endif %}{{ m['content'] }}"
    "{% for call in m['tool_calls'] or [] %}<tool_call>{{ call['function']['name'] }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def tokenizer(tmp_path, template: str | None, r1: bool = False) -> Tokenizer:
    write_tokenizer(tmp_path, r1_format=r1)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(tmp_path)


def served(tok: Tokenizer) -> SimpleNamespace:
    """What chat_prompt reads of a served model."""
    return SimpleNamespace(engine=SimpleNamespace(tokenizer=tok), name="m", reasoning=True,
                           tool_format=detect_format(tok.chat_template))


def prompt_of(tok: Tokenizer, **body) -> str:
    model = served(tok)
    return chat_prompt(model, ChatCompletionRequest.model_validate(body)).text


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("switch, effort, expected", [
    (None, None, Thinking(None, None)),
    ("enabled", None, Thinking(True, None)),
    ("disabled", "high", Thinking(False, None)),  # off: no budget to keep
    (None, "minimal", Thinking(None, 1024)), (None, "low", Thinking(None, 1024)),
    (None, "medium", Thinking(None, 8192)), (None, "high", Thinking(None, 8192)), (None, "xhigh", Thinking(None, 8192)),
    (None, "max", Thinking(None, None)), (None, "ultra", Thinking(None, None)),
    ("enabled", "none", Thinking(False, None)),
])
def test_switch_and_effort_map_as_documented(switch, effort, expected):
    assert Thinking.of(switch, effort) == expected


def test_effort_is_a_budget_unless_the_request_sets_one(tmp_path):
    model = served(tokenizer(tmp_path, None, r1=True))
    for body, budget in (({"reasoning_effort": "low"}, 1024), ({"reasoning_effort": "max"}, None),
                         ({"reasoning_effort": "low", "max_reasoning_tokens": 5}, 5), ({}, None)):
        req = ChatCompletionRequest.model_validate({"messages": ASK} | body)
        assert reasoning_spec(model, req, chat_prompt(model, req)).max_tokens == budget


def test_r1_templates_get_an_empty_think_block_when_thinking_is_off(tmp_path):
    tok = tokenizer(tmp_path, None, r1=True)  # R1's own format: the prompt opens thinking
    on = prompt_of(tok, messages=ASK)
    assert on.endswith("<think>\n")
    off = prompt_of(tok, messages=ASK, thinking={"type": "disabled"})
    assert off == on[:-len("<think>\n")] + "<think>\n\n</think>\n\n"
    assert prompt_of(tok, messages=ASK, reasoning_effort="none") == off


def test_switched_templates_are_told_and_tool_loops_keep_their_reasoning(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = tokenizer(tmp_path, SWITCHED_TEMPLATE)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                        chat_template=SWITCHED_TEMPLATE)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    # An earlier question (its thinking is dropped), then this question's tool loop (kept).
    sent = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "They greet me."},
            *ASK,
            {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
             "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    expected = [dict(m) for m in sent]
    del expected[1]["reasoning_content"]
    for m in expected:  # as templates see calls: arguments are the JSON text
        m.pop("tool_call_id", None)
    shown = prompt_of(tok, messages=sent, thinking={"type": "disabled"})
    assert shown == reference.apply_chat_template(expected, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)
    assert "I need the weather tool." in shown and "They greet me." not in shown
    assert prompt_of(tok, messages=sent).endswith("<|im_start|>assistant\n")  # no switch sent: the default


def test_a_template_without_a_switch_is_not_told(tmp_path):
    tok = tokenizer(tmp_path, HERMES_CHAT_TEMPLATE)
    assert prompt_of(tok, messages=ASK, thinking={"type": "disabled"}) == prompt_of(tok, messages=ASK)


# ---- through a server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    path = write_deepseek_v3(tmp_path_factory.mktemp("r1"), DEEPSEEK_V3_TINY, r1_tokenizer=True)
    server = ServerProcess([str(path), "--served-model-name", "r1-tiny", "--dtype", "float32", "--threads", "1"],
                           tmp_path_factory.mktemp("r1-log") / "server.log")
    yield openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    server.stop()


def test_thinking_off_answers_at_once(r1):
    kw = dict(model="r1-tiny", messages=ASK, max_tokens=12, temperature=0)
    on = r1.chat.completions.create(**kw)
    off = r1.chat.completions.create(extra_body={"thinking": {"type": "disabled"}}, **kw)
    assert on.choices[0].message.reasoning_content and on.usage.completion_tokens_details.reasoning_tokens > 0
    assert not getattr(off.choices[0].message, "reasoning_content", None)
    assert off.usage.completion_tokens_details.reasoning_tokens == 0 and off.choices[0].message.content
    assert off.usage.prompt_tokens > on.usage.prompt_tokens  # the closed think block is in the prompt


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra"])
def test_every_effort_is_taken(r1, effort):
    r = r1.chat.completions.create(model="r1-tiny", messages=ASK, max_tokens=4, temperature=0,
                                   extra_body={"reasoning_effort": effort})
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.completion_tokens_details.reasoning_tokens == 0) == (effort == "none")


def test_an_unknown_effort_is_a_400(r1):
    with pytest.raises(openai.BadRequestError) as e:
        r1.chat.completions.create(model="r1-tiny", messages=ASK, max_tokens=4, extra_body={"reasoning_effort": "huge"})
    assert e.value.body["param"] == "reasoning_effort"


# ---- the answer reserve -----------------------------------------------------------------------------


def test_the_reserve_bounds_thinking_within_max_tokens():
    from r1serve.sampling_params import ReasoningSpec, SamplingParams
    from r1serve.server.thinking import answer_reserve, reserve_answer

    assert [answer_reserve(n, None) for n in (3, 40, 4000, 100_000)] == [0, 10, 1000, 1024]
    assert answer_reserve(4000, 7) == 7
    spec = ReasoningSpec((1,), (2,))
    assert reserve_answer(SamplingParams(max_tokens=40, reasoning=spec), None).reasoning.max_tokens == 30
    budgeted = SamplingParams(max_tokens=40, reasoning=ReasoningSpec((1,), (2,), max_tokens=8))
    assert reserve_answer(budgeted, None) == budgeted  # a budget under the limit stands
    assert reserve_answer(SamplingParams(max_tokens=40, reasoning=spec), 0).reasoning.max_tokens == 40
    assert reserve_answer(SamplingParams(max_tokens=40), None).reasoning is None  # no thinking to bound


def test_a_reply_cut_by_max_tokens_still_answers(r1):
    kw = dict(model="r1-tiny", messages=ASK, max_tokens=24, temperature=0)
    reserved = r1.chat.completions.create(**kw)
    details = reserved.usage.completion_tokens_details
    assert reserved.choices[0].finish_reason == "length" and reserved.choices[0].message.content
    assert details.reasoning_tokens == 24 - 6 + 1 and details.reasoning_truncated  # thinking ended at 18, + </think>
    unreserved = r1.chat.completions.create(extra_body={"reasoning_reserve": 0}, **kw)
    assert unreserved.choices[0].message.content == ""  # a random model thinks to the limit
    assert unreserved.usage.completion_tokens_details.reasoning_tokens == 24
    assert not unreserved.usage.completion_tokens_details.reasoning_truncated
