"""One API request from engine outputs to the client: the part chat and completions share.

A job turns the RequestOutputs of its engine requests into either one JSON body or a
stream of SSE chunks, and reports its tokens and timings exactly once, whether it
finished, failed, or the client left: to the metrics, and to the usage ledger before the
response ends (so a crash after the client has its answer loses no row).
"""
from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from r1serve.engine.async_engine import EngineDeadError, EngineStepError, RequestStream
from r1serve.outputs import RequestOutput
from r1serve.accounts.accounts import Meter
from r1serve.server.errors import APIError, error_body
from r1serve.server.engine_streams import engine_error, engine_failed, merged
from r1serve.server.sse import SSE_DONE, sse
from r1serve.server.metrics import RequestTimer
from r1serve.server.protocol import SamplingFields, now
from r1serve.server.served_model import ServedModel

log = logging.getLogger("r1serve.server")


class ClientGone(Exception):
    """The client closed the connection before its stream ended."""


def _body(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _has_tokens(out: RequestOutput) -> bool:
    for c in out.outputs:  # per streamed chunk: no generator expression
        if c.token_ids:
            return True
    return False


class EventStreamResponse(Response):
    """`text/event-stream` written by a ResponseJob straight to the ASGI send; a watcher on
    the connection turns a disconnect into ClientGone on the job's engine streams, which
    aborts them (their KV blocks are freed before the next step)."""

    media_type = "text/event-stream"

    def __init__(self, job: ResponseJob, streams: list[RequestStream]) -> None:
        self.job, self.streams = job, streams
        self.status_code, self.background = 200, None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await self.job.write_events(self.streams, send)
        finally:
            watcher.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        for stream in self.streams:
            stream.abort(ClientGone())


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
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    # What each endpoint supplies.

    def first_events(self) -> list[bytes]:
        return []

    @abstractmethod
    def on_output(self, index: int, out: RequestOutput) -> list[bytes]:
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
            self.meter.accounts.in_background(self.report("aborted"))
            raise
        except APIError:  # the engine failed (merged says how)
            await self.report("error")
            raise
        finally:
            for s in streams:
                s.abort()  # a no-op for finished ones; a leaver's blocks are freed before the next step
        ordered = [finals[i] for i in range(len(streams))]
        try:
            for out in ordered:
                engine_failed(out)
        except APIError:
            await self.report("error")
            raise
        choices = self.choices(ordered)
        await self.report("ok")
        body = self.response_body(choices)
        await self.finished(body)
        return body

    async def finished(self, body: dict | None) -> None:
        """Called once the request ended well, before the client has the end of its answer:
        with the whole body (None for a stream, whose job keeps its own account)."""

    def response_body(self, choices: list[dict]) -> dict:
        """The whole (non-streamed) response, once the job has reported."""
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model.name,
                "choices": choices, "usage": self.usage(), "system_fingerprint": self.model.fingerprint}

    def closing_events(self) -> bytes:
        """What ends a stream that completed, once the job has reported."""
        usage = sse(self.envelope([]) | {"usage": self.usage()}) if self.include_usage else b""
        return usage + SSE_DONE

    def error_events(self, body: dict) -> bytes:
        """What ends a stream that failed: the error, in the format's shape."""
        return sse(body) + SSE_DONE

    async def write_events(self, streams: list[RequestStream], send: Send) -> None:
        """Stream the SSE response: one ASGI body message per engine output, written here.

        No async generator sits between a request's stream and the socket: at 32 streams a
        server writes thousands of chunks a second, and every layer a chunk passes through is
        CPU taken from the engine on small machines (docs/performance.md)."""
        tail = b""
        try:
            first = b"".join(self.first_events())
            if first:
                await send(_body(first))
            if len(streams) == 1:  # the usual case: no merging task per request
                async for out in streams[0]:
                    await self._write(0, out, send)
            else:
                async for i, out in merged(streams):
                    await self._write(i, out, send)
            await self.report("ok")
            await self.finished(None)
            tail = self.closing_events()
        except APIError as exc:
            await self.report("error")
            tail = self.error_events(exc.body())
        except (EngineDeadError, EngineStepError) as exc:  # one stream, read directly
            await self.report("error")
            tail = self.error_events(engine_error(exc).body())
        except (ClientGone, OSError):  # OSError: ASGI servers may raise it on a closed connection
            return
        except Exception as exc:  # a bug in this request's path: it ends with an error event, alone
            log.exception("streamed response %s failed", self.id)
            await self.report("error")
            tail = self.error_events(error_body(500, f"internal server error ({type(exc).__name__})"))
        finally:
            for s in streams:
                s.abort()  # a no-op for finished ones
            if not self.reported:  # the client left (or the server is stopping): counted, as aborted
                self.finish_reasons = [r or "abort" for r in self.finish_reasons]
                self.meter.accounts.in_background(self.report("aborted"))
        await send(_body(tail, more=False))

    async def _write(self, index: int, out: RequestOutput, send: Send) -> None:
        engine_failed(out)
        if _has_tokens(out):
            self.timer.on_tokens(out.metrics, streamed=True)
        events = self.on_output(index, out)
        if events:
            await send(_body(b"".join(events)))

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
