"""Tool calls and structured outputs through a real server, driven by the openai SDK and by
LangChain: a tiny Qwen2 whose chat template declares tools in the Hermes format, a tiny
DeepSeek-V3 with R1's tokens (reasoning, then calls in R1's format), and the real SmolLM2
for JSON output."""
from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3

from server_process import ServerProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                   "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(BaseModel):
    name: Literal["Ada", "Bob"]
    admin: bool


def _valid_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    schema = SCHEMAS[call.function.name]
    assert set(args) == set(schema["required"])
    for key, value in args.items():
        spec = schema["properties"][key]
        assert value in spec["enum"] if "enum" in spec else isinstance(value, bool)
    return args


@pytest.fixture(scope="module")
def client(hermes):
    return openai.OpenAI(base_url=f"{hermes.base}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, **kw):
    return client.chat.completions.create(**({"model": "tiny", "messages": ASK, "max_tokens": 120} | kw))


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_parse(client, parallel):
    r = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        _valid_call(call)
    assert not choice.message.content  # no markup leaks into the content


def test_named_choice_calls_that_function(client):
    r = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    _valid_call(call)


def test_streamed_calls_equal_the_whole_reply(client):
    kw = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=11)
    whole = chat(client, **kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chat(client, stream=True, **kw):
        for choice in chunk.choices:
            assert not choice.delta.content
            for d in choice.delta.tool_calls or ():
                if d.id is not None:  # a call's first delta: id, type and name
                    assert d.index not in calls and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
           [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_auto_and_none(client, hermes):
    auto = chat(client, tools=TOOLS, temperature=0, max_tokens=20)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert "<tool_call>" not in (auto.choices[0].message.content or "")
    none = chat(client, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_auto_calls_that_open_are_held_to_the_grammar(client, hermes, seed):
    # Pushed to open a call (the marker is one token of this vocabulary), a random model writes
    # garbage after it unless the lazy grammar takes over from the marker on.
    marker = httpx.post(f"{hermes.base}/tokenize", json={"model": "tiny", "prompt": "<tool_call>",
                                                         "add_special_tokens": False}).json()["tokens"]
    assert len(marker) == 1
    r = chat(client, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=120, parallel_tool_calls=False,
             logit_bias={str(marker[0]): 100})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    _valid_call(calls[0])


HERMES_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>'
R1_CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"utc": true}\n```'
           '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.mark.parametrize("fmt, call", [("hermes", HERMES_CALL), ("deepseek_v3", R1_CALL)])
@pytest.mark.parametrize("marker_is_a_token", [True, False])
def test_lazy_grammars_let_text_be_and_hold_calls(tmp_path, fmt, call, marker_is_a_token):
    # The opening marker as one token, or spelled out in text (a model whose vocabulary lacks
    # it, as SmolLM2 under the generic format): either way text is free and a call, once
    # opened, is held to its schema.
    import llguidance

    from r1serve.bench.random_checkpoint import write_tokenizer
    from r1serve.tokenizer import Tokenizer
    from r1serve.tool_calls import FORMATS, ToolSpec

    write_tokenizer(tmp_path, r1_format=fmt == "deepseek_v3", tools=marker_is_a_token)
    tok = Tokenizer.from_dir(tmp_path)
    marker_id = tok.token_to_id if marker_is_a_token else (lambda marker: None)
    grammar = FORMATS[fmt].lazy_grammar([ToolSpec("get_time", SCHEMAS["get_time"])], False, marker_id)
    eos = tok.token_to_id(tok.eos_token)
    lltok = llguidance.LLTokenizer(tok.to_json(), n_vocab=tok.vocab_size, eos_token=eos)

    def takes(text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, llguidance.grammar_from("grammar", grammar), log_level=0)
        ids = tok.encode(text, add_special_tokens=False) + [eos]
        return all(matcher.consume_token(i) for i in ids)

    assert takes("") and takes("The quick brown fox.") and takes("Half a marker: " + call[:6])
    assert takes(call) and takes("Let me look it up. " + call)
    assert not takes(call.replace("get_time", "get_tim"))  # no such tool
    assert not takes(call.replace("true", '"yes"'))  # arguments off the schema
    assert not takes(call + " and more text")  # text after the calls
    assert not takes(call + "\n" + call)  # parallel_tool_calls false: one call


def test_round_trip_with_a_tool_result(client, hermes):
    first = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    msg = first.choices[0].message
    history = ASK + [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp": 21}'}]
    second = chat(client, messages=history, tools=TOOLS, tool_choice="required", temperature=0)
    for call in second.choices[0].message.tool_calls:
        _valid_call(call)
    # The server renders the history as the template does, calls and result included.
    def count(messages):
        return httpx.post(f"{hermes.base}/tokenize", json={"model": "tiny", "messages": messages}).json()["count"]

    assert count(history) > count(ASK) + 10


def test_json_schema_and_parse_helper(client):
    schema = Person.model_json_schema()
    r = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                             "strict": True}}, temperature=1.0, seed=5)
    Person.model_validate_json(r.choices[0].message.content)
    parsed = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, max_tokens=120)
    assert isinstance(parsed.choices[0].message.parsed, Person)


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                          "minimum": 5, "maximum": 1}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
])
def test_bad_tools_and_formats_are_400s_naming_the_field(client, hermes, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **body)
    assert e.value.body["param"] == param, e.value.body
    hermes.wait_idle()


def test_metrics_count_tool_and_constrained_requests(hermes, client):
    chat(client, tools=TOOLS, tool_choice="required", max_tokens=60)
    assert hermes.metric("r1serve:tool_call_requests_total", tool_choice="required") >= 1
    assert hermes.metric("r1serve:structured_output_requests_total", kind="tool_call") >= 1
    assert hermes.metric("r1serve:grammar_wait_seconds_total") > 0
    hermes.wait_idle()


def test_langchain_bind_tools_and_structured_output(hermes):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=f"{hermes.base}/v1", api_key="unused", max_tokens=120, temperature=0,
                     max_retries=0)
    reply = llm.bind_tools(TOOLS, tool_choice="any").invoke("What is the weather in Paris?")
    assert reply.tool_calls and all(c["name"] in SCHEMAS for c in reply.tool_calls)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Name a person.")
    assert isinstance(person, Person)
    tooled = llm.with_structured_output(Person, method="function_calling").invoke("Name a person.")
    assert isinstance(tooled, Person)


# ---- R1: reasoning, then calls in DeepSeek's format ---------------------------------------------


# With speculative decoding by the MTP layer too: drafts go through the reasoning budget, the
# tool-call grammar and the streamed parser like any token.
@pytest.fixture(scope="module", params=[[], ["--speculative", "mtp", "--num-speculative-tokens", "2"]],
                ids=["plain", "mtp-speculative"])
def r1(request, tmp_path_factory):
    path = write_deepseek_v3(tmp_path_factory.mktemp("r1tools"), DEEPSEEK_V3_TINY, r1_tokenizer=True, tool_tokens=True)
    server = ServerProcess([str(path), "--served-model-name", "r1-tiny", "--dtype", "float32", "--threads", "1",
                            *request.param], tmp_path_factory.mktemp("r1tools-log") / "server.log")
    yield openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_r1_thinks_freely_then_calls(r1, stream):
    kw = dict(model="r1-tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=150, temperature=0,
              extra_body={"max_reasoning_tokens": 8})
    if not stream:
        r = r1.chat.completions.create(**kw)
        msg = r.choices[0].message
        reasoning, calls = msg.reasoning_content, [(c.function.name, c.function.arguments) for c in msg.tool_calls]
        assert r.usage.completion_tokens_details.reasoning_tokens == 9  # the budget held: 8 + </think>
    else:
        reasoning, calls = "", {}
        for chunk in r1.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for d in delta.tool_calls or ():
                name, args = calls.get(d.index, ("", ""))
                calls[d.index] = (d.function.name or name, args + (d.function.arguments or ""))
        calls = list(calls.values())
    assert reasoning  # the thinking was free (a random model writes anything there), the answer is calls
    assert calls
    for name, args in calls:
        assert name in SCHEMAS and set(json.loads(args)) == set(SCHEMAS[name]["required"])


# ---- the real SmolLM2: JSON output ---------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_writes_valid_json(smollm2_server):
    client = openai.OpenAI(base_url=f"{smollm2_server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Describe a user with a name and an age, as JSON."}]
    r = client.chat.completions.create(model="smollm2", messages=ask, response_format={"type": "json_object"},
                                       max_tokens=100, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    class User(BaseModel):
        name: str
        age: int

    parsed = client.chat.completions.parse(model="smollm2", messages=ask, response_format=User, max_tokens=100,
                                           temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, User)
