"""One streamed request to an OpenAI-compatible endpoint, timed chunk by chunk.

Works against anything that speaks the OpenAI streaming protocol (r1serve, vLLM, SGLang,
llama.cpp's server, the DeepSeek API). Tokens are counted from the server's usage (asked
for with stream_options.include_usage) where it gives one, else by a tokenizer.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    start: float = 0.0  # perf_counter at send
    ttft: float | None = None  # to the first generated text (reasoning or answer)
    ttfat: float | None = None  # to the first answer text, after any reasoning
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int = 0
    usage_from_server: bool = False
    text: str = ""
    reasoning: str = ""

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        # Time per output token after the first, as vLLM's benchmark defines it.
        if self.e2e is None or self.ttft is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class RequestSpec:
    messages: list[dict] | None
    prompt: str | None
    max_tokens: int


def request_body(spec: RequestSpec, model: str, ignore_eos: bool, extra: dict) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, **extra}
    if ignore_eos:  # vLLM's and r1serve's extension; other servers may refuse it
        body["ignore_eos"] = True
    if spec.messages is not None:
        return "/chat/completions", body | {"messages": spec.messages}
    return "/completions", body | {"prompt": spec.prompt}


async def send(client: httpx.AsyncClient, spec: RequestSpec, model: str, ignore_eos: bool, extra: dict,
               count_tokens) -> RequestResult:
    path, body = request_body(spec, model, ignore_eos, extra)
    r = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                r.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return r
            async for line in response.aiter_lines():
                if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                    _on_chunk(r, json.loads(line[5:]))
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.e2e = time.perf_counter() - r.start
    if r.error is None:
        r.ok = True
        if r.output_tokens is None:  # the server gave no usage: count the text ourselves
            r.output_tokens = count_tokens(r.reasoning + r.text)
    return r


def _on_chunk(r: RequestResult, chunk: dict) -> None:
    now = time.perf_counter() - r.start
    if "error" in chunk:
        r.error = str(chunk["error"].get("message", chunk["error"]))[:300]
        return
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text = delta.get("content") or choice.get("text") or ""
        thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
        if text or thought:
            r.chunk_times.append(now)
            r.ttft = r.ttft if r.ttft is not None else now
        if text and r.ttfat is None:
            r.ttfat = now
        r.text += text
        r.reasoning += thought
    usage = chunk.get("usage")
    if usage:
        r.usage_from_server = True
        r.prompt_tokens = usage.get("prompt_tokens")
        r.output_tokens = usage.get("completion_tokens")
        r.reasoning_tokens = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
