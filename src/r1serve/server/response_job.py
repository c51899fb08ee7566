"""One API request from engine outputs to the client: the part chat and completions share.

A job turns the RequestOutputs of its engine requests into either one JSON body or a
stream of SSE chunks, and reports its tokens and timings exactly once, whether it
finished, failed, or the client left: to the metrics, and to the usage ledger before the
response ends (so a crash after the client has its answer loses no row).
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import AsyncIterator

from r1serve.engine.async_engine import RequestStream
from r1serve.outputs import RequestOutput
from r1serve.server.access import Meter
from r1serve.server.errors import APIError
from r1serve.server.generation import SSE_DONE, engine_failed, merged, sse
from r1serve.server.metrics import RequestTimer
from r1serve.server.protocol import SamplingFields, now
from r1serve.server.served_model import ServedModel


class ResponseJob(ABC):
    object_name = ""  # "chat.completion" / "text_completion"
    chunk_object_name = ""

    def __init__(self, model: ServedModel, req: SamplingFields, request_id: str, num_choices: int,
                 meter: Meter) -> None:
        self.model, self.req, self.id, self.meter = model, req, request_id, meter
        self.created = now()
        self.timer = RequestTimer(model.metrics, model.name)
        self.finish_reasons: list[str | None] = [None] * num_choices
        self.reported = False

    # What each endpoint supplies.

    def first_events(self) -> list[str]:
        return []

    @abstractmethod
    def on_output(self, index: int, out: RequestOutput) -> list[str]:
        """SSE events for one delta output of engine request `index`."""

    @abstractmethod
    def choices(self, finals: list[RequestOutput]) -> list[dict]:
        """The response's choices from each engine request's final output."""

    @abstractmethod
    def usage(self) -> dict:
        """The OpenAI usage body."""

    @abstractmethod
    def counts(self) -> tuple[int, int, int, int]:
        """(prompt, cached, completion, reasoning) tokens so far."""

    # The shared part.

    async def full(self, streams: list[RequestStream]) -> dict:
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in merged(streams):
                self.timer.on_tokens(out.metrics, streamed=False)
                finals[i] = out
        except asyncio.CancelledError:  # the client left before the answer was ready
            self.meter.access.in_background(self.report("aborted"))
            raise
        ordered = [finals[i] for i in range(len(streams))]
        try:
            for out in ordered:
                engine_failed(out)
        except APIError:
            await self.report("error")
            raise
        choices = self.choices(ordered)
        await self.report("ok")
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model.name,
                "choices": choices, "usage": self.usage(), "system_fingerprint": self.model.fingerprint}

    async def events(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        try:
            for event in self.first_events():
                yield event
            async for i, out in merged(streams):
                engine_failed(out)
                if any(c.token_ids for c in out.outputs):
                    self.timer.on_tokens(out.metrics, streamed=True)
                for event in self.on_output(i, out):
                    yield event
            await self.report("ok")
            if self.include_usage:
                yield sse(self.envelope([]) | {"usage": self.usage()})
        except APIError as exc:
            await self.report("error")
            yield sse(exc.body())
        finally:
            if not self.reported:  # the client left: still counted, as aborted
                self.finish_reasons = [r or "abort" for r in self.finish_reasons]
                self.meter.access.in_background(self.report("aborted"))
        yield SSE_DONE

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def envelope(self, choices: list[dict]) -> dict:
        body = {"id": self.id, "object": self.chunk_object_name, "created": self.created, "model": self.model.name,
                "system_fingerprint": self.model.fingerprint, "choices": choices}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: every chunk has the key, only the last a value
        return body

    async def report(self, status: str) -> None:
        if self.reported:
            return
        self.reported = True
        prompt, cached, completion, reasoning = self.counts()
        self.timer.finish(prompt, completion, reasoning, self.finish_reasons)
        await self.meter.settle(prompt, cached, completion, reasoning, status)
