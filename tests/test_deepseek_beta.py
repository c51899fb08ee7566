"""DeepSeek's base URLs and beta features through real servers and the openai SDK: routes
without /v1, fill in the middle (/beta/completions with a suffix) on tiny models whose
tokenizers carry DeepSeek's or Qwen's FIM tokens, and chat prefix completion."""
from __future__ import annotations

import httpx
import openai
import pytest

from r1serve.bench.random_checkpoint import DEEPSEEK_V3_TINY, write_deepseek_v3, write_tokenizer
from r1serve.tokenizer.tokenizer import Tokenizer

from server_process import ServerProcess
from tiny_models import make_checkpoint

BEFORE, AFTER = "def double(x):\n    ", "\n    return y\n"
# Each family's FIM prompt, spelled out (prefix, suffix, then where the middle goes).
FIM_PROMPTS = {"deepseek": f"<｜fim▁begin｜>{BEFORE}<｜fim▁hole｜>{AFTER}<｜fim▁end｜>",
               "qwen": f"<|fim_prefix|>{BEFORE}<|fim_suffix|>{AFTER}<|fim_middle|>"}


@pytest.fixture(scope="module", params=["deepseek", "qwen"])
def fim_server(request, tmp_path_factory):
    where = tmp_path_factory.mktemp(f"fim-{request.param}")
    if request.param == "deepseek":
        path = write_deepseek_v3(where, DEEPSEEK_V3_TINY, r1_tokenizer=True)
        write_tokenizer(path, r1_format=True, fim=True)
    else:
        path = make_checkpoint(where, "qwen2", max_position_embeddings=2048)
        write_tokenizer(path, fim=True)
    server = ServerProcess([str(path), "--served-model-name", "coder", "--dtype", "float32", "--threads", "1"],
                           where / "server.log")
    server.family, server.tokenizer = request.param, Tokenizer.from_dir(path)
    yield server
    server.stop()


def test_fim_completes_between_prompt_and_suffix(fim_server):
    beta = openai.OpenAI(base_url=f"{fim_server.base}/beta", api_key="unused", max_retries=0, timeout=120)
    r = beta.completions.create(model="coder", prompt=BEFORE, suffix=AFTER, max_tokens=6, temperature=0, echo=True)
    expected = fim_server.tokenizer.encode(FIM_PROMPTS[fim_server.family])
    assert r.usage.prompt_tokens == len(expected)  # the family's FIM prompt, not the prompt alone
    assert r.choices[0].text.startswith(BEFORE) and r.usage.completion_tokens == 6  # echo: the prompt as sent
    plain = beta.completions.create(model="coder", prompt=BEFORE, max_tokens=1)
    assert plain.usage.prompt_tokens == len(fim_server.tokenizer.encode(BEFORE))


def test_a_model_without_fim_tokens_says_so(hermes):
    r = httpx.post(f"{hermes.base}/beta/completions", timeout=60,
                   json={"model": "tiny", "prompt": BEFORE, "suffix": AFTER, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert "tiny has no fill-in-the-middle tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{hermes.base}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": [1, 2, 3], "suffix": AFTER, "max_tokens": 2})
    assert r.status_code == 400 and "suffix needs the prompt as text" in r.json()["error"]["message"]


def test_routes_without_v1_as_deepseeks_base_url_has_them(hermes):
    bare = openai.OpenAI(base_url=hermes.base, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in bare.models.list()] == ["tiny"] and bare.models.retrieve("tiny").id == "tiny"
    r = bare.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert bare.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    schema = httpx.get(f"{hermes.base}/openapi.json", timeout=30).json()
    assert "/chat/completions" not in schema["paths"] and "/v1/chat/completions" in schema["paths"]


def test_chat_prefix_completion_continues_the_last_message(hermes):
    beta = openai.OpenAI(base_url=f"{hermes.base}/beta", api_key="unused", max_retries=0, timeout=120)
    start = "```python\ndef"
    prefixed = [{"role": "user", "content": "Write a function."},
                {"role": "assistant", "content": start, "prefix": True}]
    r = beta.chat.completions.create(model="tiny", messages=prefixed, max_tokens=5, temperature=0)
    # the same as vLLM's spelling, continue_final_message: the prompt ends in the message's text
    same = beta.chat.completions.create(
        model="tiny", messages=[dict(prefixed[0]), {"role": "assistant", "content": start}], max_tokens=5,
        temperature=0, extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert r.usage.prompt_tokens == same.usage.prompt_tokens
    def counted(messages: list[dict]) -> int:
        return httpx.post(f"{hermes.base}/tokenize", timeout=30, json={
            "model": "tiny", "messages": messages, "add_generation_prompt": False}).json()["count"]

    assert counted(prefixed) == r.usage.prompt_tokens  # /tokenize continues the message as the chat does
    whole = counted([dict(prefixed[0]), {"role": "assistant", "content": start}])
    assert r.usage.prompt_tokens < whole  # the template's end-of-turn after the message is cut
    with pytest.raises(openai.BadRequestError) as e:
        beta.chat.completions.create(model="tiny", max_tokens=2,
                                     messages=[{"role": "assistant", "content": "x", "prefix": True},
                                               {"role": "user", "content": "y"}])
    assert "prefix: true goes on the last message only" in e.value.body["message"]
