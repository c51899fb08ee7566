"""Anthropic's Messages API, driven by the `anthropic` SDK against real servers: a tiny Qwen2
whose template declares tools (Hermes format), and a tiny DeepSeek-V3 with R1's tokens, which
thinks; the second one requires keys, sent as Anthropic's clients send them (x-api-key)."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3

from platform_processes import new_key
from server_process import ServerProcess

WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                             "unit": {"type": "string", "enum": ["c", "f"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The SDK no longer names sampling fields (Anthropic's newest models refuse them); the API
# still takes them, as DeepSeek's does.
GREEDY = {"temperature": 0}


def reply(client: anthropic.Anthropic, stream: bool, **kw):
    """The whole message, read from a stream (the SDK adds its events up) or asked for whole."""
    if not stream:
        return client.messages.create(**kw)
    with client.messages.stream(**kw) as events:
        return events.get_final_message()


@pytest.fixture(scope="module")
def client(hermes):
    return anthropic.Anthropic(base_url=hermes.base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    path = write_deepseek_v3(tmp_path_factory.mktemp("r1"), DEEPSEEK_V3_TINY, r1_tokenizer=True, tool_tokens=True)
    where = tmp_path_factory.mktemp("r1-log")
    db = f"sqlite:///{where / 'keys.db'}"
    key = new_key(db, "claude-code")
    server = ServerProcess([str(path), "--served-model-name", "r1-tiny", "--dtype", "float32", "--threads", "1"],
                           where / "server.log", db=db)
    server.key = key
    yield server
    server.stop()


@pytest.fixture(scope="module")
def r1_client(r1):
    # DeepSeek's base URL for Anthropic clients ends in /anthropic: the SDK adds /v1/messages.
    return anthropic.Anthropic(base_url=f"{r1.base}/anthropic", api_key=r1.key["key"], max_retries=0, timeout=120)


def test_a_plain_message_and_its_usage(client):
    count = client.messages.count_tokens(model="tiny", messages=ASK, system="Be brief.")
    m = client.messages.create(model="tiny", max_tokens=6, messages=ASK, system="Be brief.", extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == "tiny"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 6
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == count.input_tokens > 0


def test_a_stream_has_anthropics_event_sequence_and_adds_up(client):
    with client.messages.stream(model="tiny", max_tokens=12, messages=ASK, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and kinds[-2] == "message_delta"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12 and final.content[0].text


def test_stop_sequences_say_which_matched(smollm2_server):
    # The real SmolLM2: the tiny random models write bytes that decode to no text to stop at.
    client = anthropic.Anthropic(base_url=smollm2_server.base, api_key="unused", max_retries=0, timeout=120)
    kw = dict(model="smollm2", max_tokens=24, messages=[{"role": "user", "content": "Name three colours."}],
              extra_body=GREEDY)
    free = client.messages.create(**kw).content[0].text
    # a word the model writes, first written a few characters in, so it stops there
    stop = next(w for w in free.split()[1:] if free.find(w) >= 3)
    for stream in (False, True):
        m = reply(client, stream, stop_sequences=[stop], **kw)
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
        assert m.content[0].text == free[:free.find(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip(client, stream):
    kw = dict(model="tiny", max_tokens=80, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"},
              extra_body=GREEDY)
    m = reply(client, stream, **kw)
    calls = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and calls
    call = calls[0]
    assert call.id.startswith("toolu_") and call.name == "get_weather" and set(call.input) == {"city", "unit"}
    history = ASK + [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": [{"type": "text", "text": "21 C, sunny"}]}]}]
    after = client.messages.create(model="tiny", max_tokens=5, messages=history, tools=[WEATHER], extra_body=GREEDY)
    assert after.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # the result reached the prompt: the conversation is longer by it than without it
    without = client.messages.count_tokens(model="tiny", messages=history[:2], tools=[WEATHER]).input_tokens
    assert client.messages.count_tokens(model="tiny", messages=history, tools=[WEATHER]).input_tokens > without


def test_a_named_tool_is_called(client):
    m = client.messages.create(model="tiny", max_tokens=80, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert [b.name for b in m.content if b.type == "tool_use"] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
def test_r1_thinks_in_a_signed_thinking_block(r1_client, stream):
    kw = dict(model="r1-tiny", max_tokens=40, messages=ASK, extra_body=GREEDY,
              thinking={"type": "enabled", "budget_tokens": 8})
    if stream:
        with r1_client.messages.stream(**kw) as s:
            events = list(s)
            m = s.get_final_message()
        assert "".join(e.thinking for e in events if e.type == "thinking") == m.content[0].thinking
        # the SDK keeps message_start's usage fields it does not know; the closing one says it
        usage = next(e.usage for e in events if e.type == "message_delta")
    else:
        m = r1_client.messages.create(**kw)
        usage = m.usage
    assert m.content[0].type == "thinking" and m.content[0].thinking and m.content[0].signature
    assert getattr(usage, "reasoning_truncated") is True  # the budget of 8 ended it (r1serve's usage field)
    assert m.stop_reason in ("thinking_truncated", "max_tokens")  # never a plain end_turn once thinking was cut
    # sent back as it came, the block is taken; changed, it is refused
    block = m.content[0].model_dump()
    again = ASK + [{"role": "assistant", "content": [block, {"type": "text", "text": "Sunny."}]},
                   {"role": "user", "content": "And in Oslo?"}]
    assert r1_client.messages.create(model="r1-tiny", max_tokens=2, messages=again).content
    again[1]["content"][0] = block | {"thinking": block["thinking"] + " (edited)"}
    with pytest.raises(anthropic.BadRequestError) as e:
        r1_client.messages.create(model="r1-tiny", max_tokens=2, messages=again)
    assert e.value.body["error"]["type"] == "invalid_request_error" and "signature" in e.value.body["error"]["message"]


@pytest.mark.parametrize("finish, matched, cut, expected", [
    ("stop", None, False, ("end_turn", None)),
    ("stop", None, True, ("thinking_truncated", None)),  # the answer whole, its thinking cut
    ("stop", "END", True, ("stop_sequence", "END")),
    ("length", None, True, ("max_tokens", None)),
    ("tool_calls", None, True, ("tool_use", None)),  # clients run the tools whatever the thinking
])
def test_stop_reasons(finish, matched, cut, expected):
    from r1serve.server.anthropic_messages import stop_reason

    assert stop_reason(finish, matched, cut) == expected


def test_keys_usage_and_errors_in_anthropics_shape(r1, r1_client):
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=r1.base, api_key="sk-wrong", max_retries=0).messages.create(
            model="r1-tiny", max_tokens=2, messages=ASK)
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                       "message": "Incorrect API key provided (unknown or revoked)."}}
    with pytest.raises(anthropic.NotFoundError) as e:
        r1_client.messages.create(model="nope", max_tokens=2, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        r1_client.messages.create(model="r1-tiny", max_tokens=2,
                                  messages=[{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}])
    assert "read text only" in e.value.body["error"]["message"]
    r = httpx.post(f"{r1.base}/v1/messages", headers={"x-api-key": r1.key["key"]}, timeout=30,
                   json={"model": "r1-tiny", "messages": ASK})  # max_tokens is required, as Anthropic has it
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    used = httpx.get(f"{r1.base}/v1/usage", headers={"Authorization": f"Bearer {r1.key['key']}"}, timeout=30).json()
    assert used["key"]["used_tokens"] > 0 and sum(row["requests"] for row in used["data"]) >= 1


def test_the_messages_routes_are_published(hermes):
    schema = httpx.get(f"{hermes.base}/openapi.json", timeout=30).json()
    assert {"/v1/messages", "/v1/messages/count_tokens"} <= set(schema["paths"])
    error = schema["paths"]["/v1/messages"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/AnthropicError"}
    events = json.dumps(schema["paths"]["/v1/messages"]["post"]["responses"]["200"]["content"]["text/event-stream"])
    assert "BlockDelta" in events and "[DONE]" not in events


def test_langchain_chat_anthropic_binds_tools_and_structures_output(hermes):
    from typing import Literal

    from langchain_anthropic import ChatAnthropic
    from pydantic import BaseModel

    class Person(BaseModel):
        name: Literal["Ada", "Bob"]
        admin: bool

    llm = ChatAnthropic(model="tiny", base_url=hermes.base, api_key="unused", max_tokens=120, max_retries=0,
                        model_kwargs={"extra_body": GREEDY})
    reply = llm.bind_tools([WEATHER], tool_choice="any").invoke("What is the weather in Paris?")
    assert [c["name"] for c in reply.tool_calls] and all(c["name"] == "get_weather" for c in reply.tool_calls)
    assert set(reply.tool_calls[0]["args"]) == {"city", "unit"}
    person = llm.with_structured_output(Person).invoke("Name a person.")  # a forced tool call, parsed
    assert isinstance(person, Person)
