"""What chat and completions share: request fields -> SamplingParams, context limits,
running engine requests to the end or until the client leaves, logprobs and SSE framing."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import AsyncIterator

import orjson
from fastapi import Request as HTTPRequest

from r1serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError, RequestStream
from r1serve.outputs import Logprob, RequestOutput
from r1serve.sampling_params import ReasoningSpec, SamplingParams
from r1serve.server.errors import APIError, bad_request
from r1serve.server.protocol import SamplingFields

# JSON has no -inf; vLLM reports this for tokens whose probability underflowed.
NEG_INF_LOGPROB = -9999.0


@dataclass(frozen=True)
class PromptInput:
    text: str | None
    token_ids: list[int]

    def engine_prompt(self) -> dict:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


def check_context(prompt_len: int, limit: int | None, max_model_len: int, what: str = "messages") -> int:
    """The max_tokens to use: the request's, or all the room left; 400 if it cannot fit."""
    room = max_model_len - prompt_len
    if room <= 0 or (limit is not None and limit > room):
        asked = prompt_len + (limit or 0)
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{asked} tokens ({prompt_len} in the {what}, {limit or 0} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param="max_tokens" if room > 0 else what, code="context_length_exceeded")
    return limit if limit is not None else room


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None,
                    reasoning: ReasoningSpec | None = None) -> SamplingParams:
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        # The engine's per-request generator takes a 64-bit seed; OpenAI seeds may be negative.
        seed=None if req.seed is None else req.seed % 2**63,
        max_tokens=max_tokens,
        min_tokens=min(req.min_tokens, max_tokens),
        stop=req.stop or (),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logit_bias={int(t): b for t, b in req.logit_bias.items()} if req.logit_bias else None,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        output_kind="delta" if req.stream else "final_only",
        reasoning=reasoning,
    )


def capped(params: SamplingParams, max_tokens: int) -> SamplingParams:
    """`params` with at most `max_tokens` per output (what a key's quota left the request)."""
    if max_tokens >= params.max_tokens:
        return params
    return replace(params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens))


async def start_requests(engine: AsyncEngine, ids: list[str], prompts: list[PromptInput],
                         params: SamplingParams, meter) -> list[RequestStream]:
    """Add every request or none (a rejected one aborts those already added and drops the
    meter's quota hold: a request that never ran costs nothing)."""
    streams: list[RequestStream] = []
    try:
        for rid, prompt in zip(ids, prompts):
            streams.append(await engine.add_request(rid, prompt.engine_prompt(), params))
    except BaseException:
        for s in streams:
            s.abort()
        await meter.release()
        raise
    return streams


def engine_error(exc: EngineDeadError | EngineStepError) -> APIError:
    """An engine failure as the client sees it, with its reason: 503 when the engine has
    stopped (a rank or the engine process died: retry elsewhere), 500 when one step failed."""
    return APIError(503 if isinstance(exc, EngineDeadError) else 500, str(exc))


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position."""
    try:
        async for item in _merged(streams):
            yield item
    except (EngineDeadError, EngineStepError) as exc:
        raise engine_error(exc) from exc


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


async def until_disconnect(raw: HTTPRequest, work):
    """Run a non-streaming request's work; if the client leaves first, cancel it (which aborts
    its engine requests and frees their blocks)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise APIError(499, "the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(raw: HTTPRequest) -> None:
    # The body is already read, so the next ASGI message is the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def engine_failed(out: RequestOutput) -> None:
    if out.error is not None:
        raise APIError(500, f"the engine failed this request: {out.error}")


# ---- logprobs -------------------------------------------------------------------------------


def _entry(token: str, lp: float) -> dict:
    return {"token": token, "logprob": max(lp, NEG_INF_LOGPROB), "bytes": list(token.encode("utf-8"))}


def _token_text(d: dict[int, Logprob], t: int, tokenizer) -> str:
    info = d.get(t)
    return info.decoded_token if info is not None and info.decoded_token is not None else tokenizer.decode([t])


def _top(d: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, v) for t, v in d.items() if v.rank <= k), key=lambda tv: tv[1].rank)


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int, tokenizer) -> list[dict]:
    """OpenAI chat shape: one entry per token with its top_logprobs."""
    content = []
    for t, d in zip(token_ids, logprobs):
        chosen = d.get(t)
        item = _entry(_token_text(d, t, tokenizer), chosen.logprob if chosen else NEG_INF_LOGPROB)
        item["top_logprobs"] = [_entry(_token_text(d, tt, tokenizer), v.logprob) for tt, v in _top(d, k)]
        content.append(item)
    return content


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int, tokenizer,
                        offset: int) -> dict:
    """OpenAI legacy completions shape: parallel lists; text_offset counts from `offset`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for t, d in zip(token_ids, logprobs):
        text = _token_text(d, t, tokenizer)
        chosen = d.get(t)
        tokens.append(text)
        token_lps.append(max(chosen.logprob, NEG_INF_LOGPROB) if chosen else NEG_INF_LOGPROB)
        tops.append({_token_text(d, tt, tokenizer): max(v.logprob, NEG_INF_LOGPROB) for tt, v in _top(d, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# ---- SSE -------------------------------------------------------------------------------------


def sse(data: dict) -> bytes:
    # orjson: a streamed token's chunk is encoded in ~1 µs instead of ~7 with json, and
    # straight to UTF-8 bytes (docs/performance.md, the HTTP server's CPU per chunk).
    return b"data: " + orjson.dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
