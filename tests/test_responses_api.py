"""OpenAI's Responses API through the openai SDK against real servers: the tiny Qwen2 whose
template declares tools, and a tiny DeepSeek-V3 with R1's tokens (thinking), whose server
requires keys (stored responses are each key's own)."""
from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3

from platform_processes import new_key
from server_process import ServerProcess

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                          "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def client(hermes):
    return openai.OpenAI(base_url=f"{hermes.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    where = tmp_path_factory.mktemp("r1-responses")
    path = write_deepseek_v3(where / "model", DEEPSEEK_V3_TINY, r1_tokenizer=True)
    db = f"sqlite:///{where / 'keys.db'}"
    keys = [new_key(db, name)["key"] for name in ("alice", "bob")]
    server = ServerProcess([str(path), "--served-model-name", "r1-tiny", "--dtype", "float32", "--threads", "1"],
                           where / "server.log", db=db)
    server.clients = [openai.OpenAI(base_url=f"{server.base}/v1", api_key=k, max_retries=0, timeout=120) for k in keys]
    yield server
    server.stop()


def test_text_in_text_out_and_its_usage(client):
    r = client.responses.create(model="tiny", input=ASK, instructions="Be brief.", max_output_tokens=6, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in r.output] == ["message"] and r.output_text
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + 6


def test_a_stream_adds_up_to_the_response(client):
    with client.responses.stream(model="tiny", input=ASK, max_output_tokens=10, temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and kinds.count("response.output_item.done") == 1
    assert final.output_text and final.usage.output_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_round_trip(client, stream):
    kw = dict(model="tiny", input=ASK, tools=[WEATHER], tool_choice="required", max_output_tokens=80, temperature=0)
    if stream:
        with client.responses.stream(**kw) as events:
            r = events.get_final_response()
    else:
        r = client.responses.create(**kw)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    assert set(json.loads(calls[0].arguments)) == {"city", "unit"}
    follow = [{"role": "user", "content": ASK}, *[c.model_dump(exclude_none=True) for c in calls],
              *[{"type": "function_call_output", "call_id": c.call_id, "output": "21 C"} for c in calls]]
    after = client.responses.create(model="tiny", input=follow, tools=[WEATHER], max_output_tokens=4, temperature=0)
    assert after.usage.input_tokens > r.usage.input_tokens  # the calls and their results are in the prompt


def test_text_format_json_schema_and_parse(client):
    class City(BaseModel):  # choices only: a random model ends them (a free string it may never close)
        name: Literal["Paris", "Oslo"]
        sunny: bool

    r = client.responses.parse(model="tiny", input="A city as JSON.", text_format=City, max_output_tokens=60,
                               temperature=0)
    assert isinstance(r.output_parsed, City)


def test_r1_reasoning_is_an_item_and_effort_bounds_it(r1):
    alice = r1.clients[0]
    r = alice.responses.create(model="r1-tiny", input=ASK, max_output_tokens=20, temperature=0,
                               reasoning={"effort": "low"})
    assert [item.type for item in r.output][0] == "reasoning" and r.output[0].content[0].text
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    off = alice.responses.create(model="r1-tiny", input=ASK, max_output_tokens=8, temperature=0,
                                 reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"]


def test_stored_responses_continue_and_are_each_keys_own(r1):
    alice, bob = r1.clients
    first = alice.responses.create(model="r1-tiny", input="Remember the word teal.", max_output_tokens=6,
                                   temperature=0)
    again = alice.responses.create(model="r1-tiny", input="Which word?", previous_response_id=first.id,
                                   max_output_tokens=4, temperature=0)
    alone = alice.responses.create(model="r1-tiny", input="Which word?", max_output_tokens=4, temperature=0)
    assert again.previous_response_id == first.id and again.usage.input_tokens > alone.usage.input_tokens + 6
    assert alice.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(first.id)  # another key's
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="r1-tiny", input="Which word?", previous_response_id=first.id, max_output_tokens=2)
    unstored = alice.responses.create(model="r1-tiny", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)
    assert alice.responses.delete(first.id) is None  # the SDK returns nothing for a deletion
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(first.id)


def test_bad_input_is_a_400_naming_it(r1):
    r = httpx.post(f"{r1.base}/v1/responses", timeout=30, headers={"Authorization": f"Bearer {r1.clients[0].api_key}"},
                   json={"model": "r1-tiny", "input": [{"role": "user", "content": [
                       {"type": "input_image", "image_url": "http://x/y.png"}]}]})
    assert r.status_code == 400 and "read text only" in r.json()["error"]["message"]


def test_stored_responses_expire(db):
    import datetime as dt

    from r1serve.accounts.database import migrate, open_database, stored_responses
    from r1serve.accounts.response_store import ResponseStore

    engine = open_database(db)
    migrate(engine)
    store = ResponseStore(engine)
    store.save({"id": "resp_old"}, [{"role": "user", "content": "hi"}], None)
    assert store.load("resp_old", None) == ({"id": "resp_old"}, [{"role": "user", "content": "hi"}])
    assert store.load("resp_old", "key_other") is None  # another key's
    aged = ResponseStore(engine, kept=dt.timedelta(0))  # as if 30 days had passed
    assert aged.load("resp_old", None) is None
    aged.save({"id": "resp_new"}, [], None)  # a save sweeps what has expired
    with engine.connect() as conn:
        assert [r.id for r in conn.execute(stored_responses.select())] == ["resp_new"]
