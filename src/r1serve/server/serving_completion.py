"""POST /v1/completions: one or more prompts (text or token ids) -> OpenAI text completions.

With several prompts and n choices each, choice `index` is prompt_index * n + choice, as
the OpenAI API numbers them.
"""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from r1serve.engine.async_engine import RequestStream
from r1serve.outputs import CompletionOutput
from r1serve.server.errors import APIError
from r1serve.server.generation import (SSE_DONE, PromptInput, check_context, completion_logprobs, engine_failed,
                                       merged, sampling_params, sse, start_requests, until_disconnect)
from r1serve.server.metrics import RequestTimer
from r1serve.server.protocol import CompletionRequest, new_id, now, usage_body
from r1serve.server.served_model import ServedModel


def completion_prompts(model: ServedModel, req: CompletionRequest) -> list[PromptInput]:
    tok = model.engine.tokenizer
    return [PromptInput(p, tok.encode(p)) if isinstance(p, str) else PromptInput(None, list(p))
            for p in req.prompts()]


async def create_completion(model: ServedModel, req: CompletionRequest, raw: HTTPRequest):
    engine = model.engine
    prompts = completion_prompts(model, req)
    max_tokens = min(check_context(len(p.token_ids), req.max_tokens, engine.max_model_len, "prompt") for p in prompts)
    params = sampling_params(req, max_tokens, req.logprobs)
    request_id = new_id("cmpl")
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    streams = await start_requests(engine, ids, prompts, params)
    job = _Completion(model, req, request_id, prompts, RequestTimer(model.metrics, model.name))
    if req.stream:
        return StreamingResponse(job.events(streams), media_type="text/event-stream")
    return JSONResponse(await until_disconnect(raw, job.full(streams)))


class _Completion:
    def __init__(self, model: ServedModel, req: CompletionRequest, request_id: str, prompts: list[PromptInput],
                 timer: RequestTimer) -> None:
        self.model, self.req, self.id, self.prompts, self.timer = model, req, request_id, prompts, timer
        self.created = now()
        slots = len(prompts) * req.n
        self.completion_tokens = [0] * slots
        self.text_len = [0] * slots  # text handed out per choice, for logprobs' text_offset
        self.finish_reasons: list[str | None] = [None] * slots
        self.cached = [0] * len(prompts)
        self.reported = False  # metrics recorded

    def _echo(self, p: int) -> str:
        prompt = self.prompts[p]
        return prompt.text if prompt.text is not None else self.model.engine.tokenizer.decode(prompt.token_ids)

    def _choice(self, p: int, c: CompletionOutput, first: bool) -> dict:
        slot = p * self.req.n + c.index
        text = (self._echo(p) if self.req.echo and first else "") + c.text
        logprobs = None
        if c.logprobs is not None:
            logprobs = completion_logprobs(c.token_ids, c.logprobs, self.req.logprobs or 0,
                                           self.model.engine.tokenizer, self.text_len[slot])
        self.text_len[slot] += len(text)
        self.completion_tokens[slot] += len(c.token_ids)
        if c.finished:
            self.finish_reasons[slot] = c.finish_reason
        return {"index": slot, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    async def full(self, streams: list[RequestStream]) -> dict:
        finals = {}
        async for p, out in merged(streams):
            self.timer.on_tokens(out.metrics, streamed=False)
            finals[p] = out
        choices = []
        for p in range(len(self.prompts)):
            engine_failed(finals[p])
            self.cached[p] = finals[p].num_cached_tokens
            choices += [self._choice(p, c, first=True) for c in finals[p].outputs]
        self._finish()
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model.name,
                "choices": choices, "usage": self._usage(), "system_fingerprint": self.model.fingerprint}

    async def events(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        started: set[int] = set()
        try:
            async for p, out in merged(streams):
                engine_failed(out)
                self.cached[p] = out.num_cached_tokens
                if any(c.token_ids for c in out.outputs):
                    self.timer.on_tokens(out.metrics, streamed=True)
                for c in out.outputs:
                    slot = p * self.req.n + c.index
                    if not (c.text or c.token_ids or c.finished):
                        continue
                    choice = self._choice(p, c, first=slot not in started)
                    started.add(slot)
                    yield sse(self._envelope([choice]))
            self._finish()
            if include_usage:
                yield sse(self._envelope([]) | {"usage": self._usage()})
        except APIError as exc:
            yield sse(exc.body())
        finally:
            if not self.reported:  # the client left (or the request failed): still counted
                self.finish_reasons = [r or "abort" for r in self.finish_reasons]
                self._finish()
        yield SSE_DONE

    def _envelope(self, choices: list[dict]) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model.name,
                "system_fingerprint": self.model.fingerprint, "choices": choices}
        if self.req.stream_options and self.req.stream_options.include_usage:
            body["usage"] = None
        return body

    def _usage(self) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return usage_body(prompt_tokens, sum(self.completion_tokens), sum(self.cached), 0)

    def _finish(self) -> None:
        self.reported = True
        self.timer.finish(sum(len(p.token_ids) for p in self.prompts), sum(self.completion_tokens), 0,
                          self.finish_reasons)
