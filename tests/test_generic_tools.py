"""Tool calls on a model whose chat template has none: the real SmolLM2 through the openai
SDK, told of the tools in the prompt and held to the call's grammar when a call is forced
or, under "auto", once it opens one."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from r1serve.server.generic_tools import with_generic_tools
from r1serve.server.protocol import Tool

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                   "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "unit"} and args["city"] in ("Paris", "Oslo") and args["unit"] in ("c", "f")
    return name == "get_time" and set(args) == {"utc"} and isinstance(args["utc"], bool)


def test_the_conversation_is_written_for_a_template_without_tools():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    conv = [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    out = with_generic_tools(conv, [Tool.model_validate(WEATHER)])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}
    assert with_generic_tools(ASK, None) == ASK  # nothing offered, nothing added


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=f"{smollm2_server.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", "named", "required-streamed", "required-one"])
def test_forced_calls_on_a_model_without_a_tool_template(client, choice):
    kw = dict(model="smollm2", messages=ASK, tools=[WEATHER, TIME], max_tokens=100, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_time"}} if choice == "named" else "required",
              parallel_tool_calls=choice != "required-one")
    if choice.endswith("streamed"):
        calls: dict[int, list[str]] = {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for d in chunk.choices[0].delta.tool_calls or ():
                entry = calls.setdefault(d.index, ["", ""])
                entry[0] += d.function.name or ""
                entry[1] += d.function.arguments or ""
        found = [tuple(c) for c in calls.values()]
    else:
        r = client.chat.completions.create(**kw)
        # Allowed several calls, a 135M model repeats them until max_tokens: the calls written
        # whole are returned (the cut one is not).
        ends = ("tool_calls", "length") if kw["parallel_tool_calls"] else ("tool_calls",)
        assert r.choices[0].finish_reason in ends and r.choices[0].message.content is None
        found = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert found and all(valid(name, args) for name, args in found)
    if choice == "named":
        assert [name for name, _ in found] == ["get_time"]
    if choice == "required-one":
        assert len(found) == 1


@pytest.mark.slow
def test_auto_calls_that_open_are_held_to_the_grammar(client, smollm2_server):
    # SmolLM2 never calls on its own; pushed onto the pieces of the spelled-out marker
    # "<tool_call>" it sometimes opens a call and, unheld, writes garbage after it. Under
    # "auto" the lazy grammar takes over at the marker: every call it opens validates.
    marker = httpx.post(f"{smollm2_server.base}/tokenize", json={
        "model": "smollm2", "prompt": "<tool_call>", "add_special_tokens": False}).json()["tokens"]
    assert len(marker) > 1
    calls = []
    for seed in range(6):
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                                           tools=[WEATHER, TIME], max_tokens=60, temperature=1.0, seed=seed,
                                           parallel_tool_calls=False, logit_bias={str(t): 100 for t in marker})
        choice = r.choices[0]
        assert "<tool_call>" not in (choice.message.content or "")
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
            calls += [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls and all(valid(name, args) for name, args in calls)


@pytest.mark.slow
def test_a_round_trip_reaches_the_prompt(client, smollm2_server):
    first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"}]
    second = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], max_tokens=30,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result are in the prompt as text: more tokens than the question and the tools alone
    alone = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 10
    counted = httpx.post(f"{smollm2_server.base}/tokenize", timeout=60,
                         json={"model": "smollm2", "messages": ASK, "tools": [WEATHER]}).json()
    assert counted["count"] == alone.usage.prompt_tokens  # /tokenize renders the tools as the chat does
    r = httpx.post(f"{smollm2_server.base}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 1})
    assert r.status_code == 200  # tools offered but not to be called: not written into the prompt
    assert r.json()["usage"]["prompt_tokens"] < alone.usage.prompt_tokens
