"""The server under abuse: malformed requests, clients that leave mid-stream, a full queue,
SIGTERM with requests running. Each ends in a 4xx/5xx with OpenAI's error body or a clean
finish, and the server stays healthy with no request running and no KV block in use."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from server_process import ServerProcess

MODEL = "smollm2"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def assert_openai_error(r: httpx.Response, status: int, *, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **kw}


MALFORMED = {
    "bad json": dict(content=b'{"model": "smollm2", "messages": ['),
    "not an object": dict(json=[1, 2, 3]),
    "no body": dict(content=b""),
    "messages a string": dict(json=chat_body(messages="hi")),
    "empty messages": dict(json=chat_body(messages=[])),
    "bad role": dict(json=chat_body(messages=[{"role": "wizard", "content": "hi"}])),
    "image part": dict(json=chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
    "max_tokens a word": dict(json=chat_body(max_tokens="ten")),
    "max_tokens zero": dict(json=chat_body(max_tokens=0)),
    "temperature a word": dict(json=chat_body(temperature="hot")),
    "top_p above one": dict(json=chat_body(top_p=1.5)),
    "n zero": dict(json=chat_body(n=0)),
    "stop a number": dict(json=chat_body(stop=7)),
    "empty stop": dict(json=chat_body(stop=[""])),
    "top_logprobs too many": dict(json=chat_body(logprobs=True, top_logprobs=50)),
    "stream_options without stream": dict(json=chat_body(stream_options={"include_usage": True})),
    "a tool without a valid name": dict(json=chat_body(tools=[{"type": "function", "function": {"name": "f g"}}])),
    "non-utf8 bytes": dict(content=b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_chat_requests(smollm2_server, case):
    kw = MALFORMED[case]
    headers = {"content-type": "application/json"}
    r = httpx.post(smollm2_server.base + CHAT, headers=headers, timeout=30, **kw)
    assert_openai_error(r, 400)


@pytest.mark.slow
def test_other_bad_requests(smollm2_server):
    base = smollm2_server.base
    assert_openai_error(httpx.post(base + CHAT, json=chat_body(model="nope"), timeout=30), 404, code="model_not_found")
    assert_openai_error(httpx.post(base + CHAT, json=chat_body(max_tokens=10**9), timeout=30), 400,
                        code="context_length_exceeded")
    long_prompt = {"model": MODEL, "prompt": [1] * 9000, "max_tokens": 1}
    assert_openai_error(httpx.post(base + "/v1/completions", json=long_prompt, timeout=30), 400,
                        code="context_length_exceeded")
    out_of_vocab = {"model": MODEL, "prompt": [10**8], "max_tokens": 1}
    assert "vocabulary" in assert_openai_error(httpx.post(base + "/v1/completions", json=out_of_vocab, timeout=30), 400)["message"]
    mixed = {"model": MODEL, "prompt": ["a", [1, 2]], "max_tokens": 1}
    assert "prompt" in assert_openai_error(httpx.post(base + "/v1/completions", json=mixed, timeout=30), 400)["message"]
    assert_openai_error(httpx.get(base + CHAT, timeout=30), 405)
    assert_openai_error(httpx.get(base + "/v1/nothing-here", timeout=30), 404)
    assert_openai_error(httpx.post(base + "/detokenize", json={"tokens": [10**8]}, timeout=30), 400)


@pytest.mark.slow
def test_oversized_bodies(smollm2_server):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (2 * 2**20)}])).encode()
    url = smollm2_server.base + CHAT
    headers = {"content-type": "application/json"}
    assert_openai_error(httpx.post(url, content=big, headers=headers, timeout=30), 413)

    def chunked():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert_openai_error(httpx.post(url, content=chunked(), headers=headers, timeout=30), 413)


@pytest.mark.slow
def test_healthy_after_abuse(smollm2_server):
    for kw in MALFORMED.values():
        httpx.post(smollm2_server.base + CHAT, headers={"content-type": "application/json"}, timeout=30, **kw)
    assert httpx.get(smollm2_server.base + "/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(smollm2_server.base + CHAT, json=chat_body(temperature=0), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    smollm2_server.wait_idle()


@pytest.mark.slow
def test_32_streams_a_third_leaving_early(smollm2_server):
    """32 concurrent streaming clients; every third one leaves after two chunks."""
    client = openai.AsyncOpenAI(base_url=smollm2_server.base + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i: int):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {i} upwards."}], max_tokens=48,
            temperature=0.7, seed=i, stream=True, extra_body={"ignore_eos": True})
        chunks, reason = 0, "no finish"
        async for chunk in stream:
            chunks += 1
            if i % 3 == 0 and chunks == 2:
                break
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        await stream.close()
        return None if i % 3 == 0 else reason

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    reasons = asyncio.run(main())
    assert [r for i, r in enumerate(reasons) if i % 3] == ["length"] * 21
    smollm2_server.wait_idle()
    # The requests of clients that left are counted as aborted.
    assert smollm2_server.metric("r1serve:request_success_total", finished_reason="abort") >= 11


# ---- a tiny model, for drain and queue limits ----------------------------------------------------


@pytest.fixture()
def tiny_server(tiny, tmp_path):
    server = ServerProcess([str(tiny), "--served-model-name", "tiny", "--dtype", "float32", "--max-num-seqs", "1",
                            "--max-waiting", "1", "--threads", "1", "--shutdown-grace", "30"], tmp_path / "server.log")
    yield server
    server.stop()


LONG = {"model": "tiny", "prompt": [5, 17, 42], "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def test_full_queue_answers_429(tiny_server):
    results: list[httpx.Response] = []

    def call():
        results.append(httpx.post(tiny_server.base + "/v1/completions", json=LONG, timeout=120))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [r for r in results if r.status_code == 429]
    assert busy and any(r.status_code == 200 for r in results)
    for r in busy:
        assert r.headers["retry-after"] == "1"
        assert_openai_error(r, 429, code="queue_full")
    tiny_server.wait_idle()


def test_sigterm_lets_running_requests_finish(tiny_server):
    finish = {}

    def stream():
        with httpx.stream("POST", tiny_server.base + "/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    finish["seen"] = True
                    reason = json.loads(line[6:])["choices"][0]["finish_reason"]
                    if reason:
                        finish["reason"] = reason
                if line == "data: [DONE]":
                    finish["done"] = True

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 60
    while "seen" not in finish and time.monotonic() < deadline:
        time.sleep(0.01)
    tiny_server.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert finish.get("reason") == "length" and finish.get("done")
    # uvicorn re-raises the signal once drained, so "stopped by SIGTERM" is the clean exit.
    assert tiny_server.proc.wait(60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(tiny_server.base + "/health", timeout=5)


@pytest.mark.slow
def test_common_slips_get_errors_that_say_what_to_do(smollm2_server):
    base = smollm2_server.base
    body = json.dumps(chat_body()).encode()
    r = httpx.post(base + CHAT, content=body, headers={"content-type": "application/x-www-form-urlencoded"},
                   timeout=30)  # what `curl -d` sends without -H
    assert "Content-Type: application/json" in assert_openai_error(r, 400)["message"]
    r = httpx.post(base + CHAT, json=chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), timeout=30)
    assert "read text only" in assert_openai_error(r, 400)["message"]
    r = httpx.post(base + "/v1/embeddings", json={"model": MODEL, "input": "hi"}, timeout=30)
    assert "no embedding model" in assert_openai_error(r, 404)["message"]
    r = httpx.post(base + "/v1/nothing", json={}, timeout=30)
    assert "no route POST /v1/nothing" in assert_openai_error(r, 404)["message"]
    r = httpx.post(base + CHAT, json={"messages": HELLO, "max_tokens": 2}, timeout=30)  # no model: the one served
    assert r.status_code == 200 and r.json()["model"] == MODEL
