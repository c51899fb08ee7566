"""A real `r1serve serve` process on SmolLM2, driven by the official openai SDK."""
from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from r1serve.config import EngineConfig

pytestmark = pytest.mark.slow

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.base + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=f"{smollm2_server.base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "r1serve"
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_greedy(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 20
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens == 0
    extra = u.model_extra  # DeepSeek's fields
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert extra["prompt_cache_hit_tokens"] == u.prompt_tokens_details.cached_tokens


def test_chat_stream_matches_non_stream(client):
    # Warm the prefix cache first, so both compared runs prefill the same rows (a cold and a
    # warm prefill may round differently in bf16), whichever tests ran before this one.
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1, temperature=0)
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_and_length(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    text = r.choices[0].text
    assert " 5, 6," in text and " 7" not in text and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"], stream=True) if c.choices)
    assert streamed == text


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a word."}], max_tokens=8,
              temperature=1.0, seed=1234, n=2)
    # Warm the prefix cache first: a cache hit changes how many rows the prefill GEMMs see,
    # and bf16 GEMM rounding depends on that (the seeded draws themselves do not).
    client.chat.completions.create(**kw)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 16  # both choices counted
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in a.choices]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the top token
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token


def test_completions_prompts_and_token_ids(client, smollm2_server):
    tokens = post(smollm2_server, "/tokenize", {"model": MODEL, "prompt": "The sky is"})["tokens"]
    r = client.completions.create(model=MODEL, prompt=["The sky is", "The sky is"], max_tokens=6, temperature=0,
                                  logprobs=2, echo=False)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # one batch: the same rows
    # As ids, and echoed: each a batch of two as well, so each runs the GEMMs at the same row
    # counts as `r` (a batch of one may round differently in bf16).
    by_ids = client.completions.create(model=MODEL, prompt=[tokens, tokens], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text  # the same prompt, as text and as ids
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert r.usage.prompt_tokens == 2 * len(tokens)
    echo = client.completions.create(model=MODEL, prompt=["The sky is", "The sky is"], max_tokens=6, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The sky is" + r.choices[0].text


def test_detokenize_roundtrip(client, smollm2_server):
    tokens = post(smollm2_server, "/tokenize", {"model": MODEL, "prompt": "Paris, France"})
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] > 0
    text = post(smollm2_server, "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})["prompt"]
    assert text.endswith("Paris, France")


def test_multi_turn_drops_earlier_reasoning(client, smollm2_server):
    with_thinking = [*QUESTION, {"role": "assistant", "content": "<think>\nsecret plan\n</think>\n\nParis.",
                                 "reasoning_content": "secret plan"}, {"role": "user", "content": "And Spain?"}]
    without = [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    a = post(smollm2_server, "/tokenize", {"model": MODEL, "messages": with_thinking})
    b = post(smollm2_server, "/tokenize", {"model": MODEL, "messages": without})
    assert a["tokens"] == b["tokens"]


REASONING_PROMPT = [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "<think>\n"}]
REASONING = dict(model=MODEL, messages=REASONING_PROMPT, max_tokens=40, temperature=0,
                 extra_body={"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True,
                             "max_reasoning_tokens": 10})


def test_reasoning_end_to_end(client, smollm2_server):
    end_tokens = post(smollm2_server, "/tokenize",
                      {"model": MODEL, "prompt": "</think>", "add_special_tokens": False})["count"]
    # Once first, so both requests compared below find the prompt's full blocks in the prefix
    # cache: a cold prefill runs other GEMM kernels (by row count) than the warm one, and
    # greedy text past the forced </think> may then part ways in the last bits.
    client.chat.completions.create(**REASONING)
    r = client.chat.completions.create(**REASONING)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] and msg.content
    assert "<think>" not in msg.content and "</think>" not in msg.content + msg.model_extra["reasoning_content"]
    assert r.usage.completion_tokens_details.reasoning_tokens == 10 + end_tokens

    reasoning = content = ""
    chunks = list(client.chat.completions.create(**REASONING, stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        if c.choices:
            reasoning += c.choices[0].delta.model_extra.get("reasoning_content") or ""
            content += c.choices[0].delta.content or ""
    assert (reasoning, content) == (msg.model_extra["reasoning_content"], msg.content)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 10 + end_tokens
    assert smollm2_server.metric("r1serve:reasoning_tokens_total") >= 2 * (10 + end_tokens)


def test_reasoning_budget_needs_a_reasoning_request_field_valid(client):
    with pytest.raises(openai.BadRequestError, match="max_reasoning_tokens"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"max_reasoning_tokens": -1})


def test_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**7)
    assert e.value.code == "context_length_exceeded" and "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_logprobs=2)


def scrape(server) -> dict[str, float]:
    """Every sample of /metrics, summed over its label sets. A labelled series appears with its
    first observation, so a name missing here has counted nothing yet."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(server.base + "/metrics", timeout=10).text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_exposed(client, smollm2_server):
    block_size = EngineConfig.__dataclass_fields__["block_size"].default  # the server runs with the default
    # A prompt no request has sent before (whatever ran earlier on this server): past the chat
    # template's shared opening, the prefix cache holds of it only what this test puts there.
    fresh = [{"role": "user", "content": f"Metrics test {uuid.uuid4().hex}: name one colour of the rainbow."}]
    kw = dict(model=MODEL, messages=fresh, max_tokens=4, temperature=0)
    before = scrape(smollm2_server)
    cold = client.chat.completions.create(**kw)
    warm = client.chat.completions.create(**kw)
    between = scrape(smollm2_server)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    after = scrape(smollm2_server)

    def moved(name: str) -> float:
        return delta(before, after, f"r1serve:{name}")

    prompt = cold.usage.prompt_tokens
    generated = [cold.usage.completion_tokens, warm.usage.completion_tokens, chunks[-1].usage.completion_tokens]
    assert moved("prompt_tokens_total") == 3 * prompt
    assert moved("generation_tokens_total") == moved("answer_tokens_total") == sum(generated)
    assert moved("reasoning_tokens_total") == 0  # no <think> in this prompt
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"{name}_seconds_count") == 3, name
    assert moved("request_success_total") == 3
    # The streamed request's first content chunk is its first answer token; each chunk after it
    # that carries tokens (text, or the finish) is one inter-token gap, observed for streams only.
    streamed = [c for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].finish_reason)]
    assert delta(between, after, "r1serve:time_to_first_answer_token_seconds_count") == 1
    assert moved("inter_token_latency_seconds_count") == len(streamed) - 1
    # The prefix cache: every prompt token is looked up; a warm request finds all full blocks but
    # the one holding the last token (its logits must be computed), and the engine's hit counter
    # moves by what the responses report as cached.
    assert moved("prefix_cache_queries_total") == 3 * prompt
    full = (prompt - 1) // block_size * block_size
    assert warm.usage.prompt_tokens_details.cached_tokens == full > cold.usage.prompt_tokens_details.cached_tokens
    assert moved("prefix_cache_hits_total") == cold.usage.prompt_tokens_details.cached_tokens + 2 * full
    # All three are done: nothing runs or waits, and no block is held by a request.
    assert after["r1serve:num_requests_running"] == after["r1serve:num_requests_waiting"] == 0
    assert after["r1serve:kv_cache_usage_perc"] == 0


def test_non_streamed_answer_without_reasoning_times_its_first_answer_token(client, smollm2_server):
    before = scrape(smollm2_server)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.model_extra.get("reasoning_content")
    after = scrape(smollm2_server)
    assert delta(before, after, "r1serve:time_to_first_answer_token_seconds_count") == 1
