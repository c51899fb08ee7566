"""POST /v1/completions: one or more prompts (text or token ids) -> OpenAI text completions.

With several prompts and n choices each, choice `index` is prompt_index * n + choice, as
the OpenAI API numbers them.
"""
from __future__ import annotations

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.accounts.accounts import Accounts, Meter, Principal
from r1serve.server.errors import APIError
from r1serve.server.fim import FimFormat, fim_format
from r1serve.server.engine_request import PromptInput, capped, check_context, sampling_params
from r1serve.server.engine_streams import start_requests, until_disconnect
from r1serve.server.logprobs import completion_logprobs
from r1serve.server.sse import sse
from r1serve.server.protocol import CompletionRequest, new_id, usage_body
from r1serve.server.request_log import JOB
from r1serve.server.response_job import EventStreamResponse, ResponseJob
from r1serve.server.served_model import ServedModel


def completion_prompts(model: ServedModel, req: CompletionRequest) -> list[PromptInput]:
    tok = model.engine.tokenizer
    if req.suffix:  # the prompt's text stays the prompt (echo shows it); the tokens are the FIM prompt's
        fim = _fim(model)
        return [PromptInput(p, tok.encode(fim.prompt(p, req.suffix))) for p in req.prompts()]
    return [PromptInput(p, tok.encode(p)) if isinstance(p, str) else PromptInput(None, list(p))
            for p in req.prompts()]


def _fim(model: ServedModel) -> FimFormat:
    found = fim_format(model.engine.tokenizer)
    if found is None:
        raise APIError(400, f"{model.name} has no fill-in-the-middle tokens (DeepSeek's, Qwen's or StarCoder's), so "
                            "it cannot complete between a prompt and a suffix; send no suffix", param="suffix")
    return found


async def create_completion(model: ServedModel, req: CompletionRequest, raw: HTTPRequest, accounts: Accounts,
                            principal: Principal):
    engine = model.engine
    prompts = completion_prompts(model, req)
    max_tokens = min(check_context(len(p.token_ids), req.max_tokens, engine.max_model_len, "prompt") for p in prompts)
    params = sampling_params(req, max_tokens, req.logprobs)
    request_id = new_id("cmpl")
    meter = accounts.meter(principal, model.name, request_id)
    granted = await meter.hold(sum(len(p.token_ids) for p in prompts), req.n * len(prompts), max_tokens)
    params = capped(params, granted)
    job = _Completion(model, req, request_id, prompts, meter)
    ids = [job.id] if len(prompts) == 1 else [f"{job.id}-{i}" for i in range(len(prompts))]
    setattr(raw.state, JOB, job)  # its tokens go in the request's log line
    streams = await start_requests(engine, ids, prompts, params, meter)
    if req.stream:
        return EventStreamResponse(job, streams)
    return JSONResponse(await until_disconnect(raw, job.full(streams)))


class _Completion(ResponseJob):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, model: ServedModel, req: CompletionRequest, request_id: str, prompts: list[PromptInput],
                 meter: Meter) -> None:
        super().__init__(model, req, request_id, len(prompts) * req.n, meter)
        self.prompts = prompts
        slots = len(prompts) * req.n
        self.completion_tokens = [0] * slots
        self.text_len = [0] * slots  # text handed out per choice, for logprobs' text_offset
        self.started: set[int] = set()  # choices that have had their first chunk (echo goes there)
        self.cached = [0] * len(prompts)

    def _echo(self, p: int) -> str:
        prompt = self.prompts[p]
        return prompt.text if prompt.text is not None else self.model.engine.tokenizer.decode(prompt.token_ids)

    def _choice(self, p: int, c: CompletionOutput) -> dict:
        slot = p * self.req.n + c.index
        text = (self._echo(p) if self.req.echo and slot not in self.started else "") + c.text
        self.started.add(slot)
        logprobs = None
        if c.logprobs is not None:
            logprobs = completion_logprobs(c.token_ids, c.logprobs, self.req.logprobs or 0,
                                           self.model.engine.tokenizer, self.text_len[slot])
        self.text_len[slot] += len(text)
        self.completion_tokens[slot] += len(c.token_ids)
        if c.finished:
            self.finish_reasons[slot] = c.finish_reason
        return {"index": slot, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}

    def choices(self, finals: list[RequestOutput]) -> list[dict]:
        for p, final in enumerate(finals):
            self.cached[p] = final.num_cached_tokens
        return [self._choice(p, c) for p, final in enumerate(finals) for c in final.outputs]

    def on_output(self, index: int, out: RequestOutput) -> list[bytes]:
        self.cached[index] = out.num_cached_tokens
        return [sse(self.envelope([self._choice(index, c)])) for c in out.outputs
                if c.text or c.token_ids or c.finished]

    def usage(self) -> dict:
        prompt_tokens, cached, completion_tokens, _ = self.counts()
        return usage_body(prompt_tokens, completion_tokens, cached, 0)

    def counts(self) -> tuple[int, int, int, int]:
        return sum(len(p.token_ids) for p in self.prompts), sum(self.cached), sum(self.completion_tokens), 0
