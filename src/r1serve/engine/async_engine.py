"""The engine for asyncio callers: model steps on a thread of their own, one queue per request.

    event loop (server)                       engine thread
    -------------------                       -------------
    add_request() --(inbox: add/abort)------> apply commands, engine.step()
    RequestStream  <--(call_soon_threadsafe)-- outputs of the step, one batch per step

The LLMEngine is touched by the engine thread only; the event loop never blocks on a model
step. Commands are applied between steps, so an add or abort waits at most one step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from r1serve.engine.llm_engine import LLMEngine, Prompt
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams

log = logging.getLogger("r1serve.engine")


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's counters after its latest step (read by the server without locking)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0  # loop iterations (steps and command batches)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can run."""


class RequestStream:
    """The outputs of one request, as an async iterator; ends after the finished output."""

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            self._engine.forget(self.request_id)
            raise item
        if item.finished:
            self.finished = True
            self._engine.forget(self.request_id)
        return item

    def abort(self) -> None:
        """Stop the request (a client went away): its KV blocks are freed before the next step."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.loaded.arch.vocab_size
        self.snapshot = EngineSnapshot()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # touched by the event loop only
        self._inbox: list[tuple] = []  # guarded by _wake
        self._pending_adds = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="r1serve-engine", daemon=True)

    def start(self) -> AsyncEngine:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        return self

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: waiting in the scheduler plus adds not yet applied."""
        return self.snapshot.num_requests_waiting + self._pending_adds

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ---- event-loop side -------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Queue a request; raises what LLMEngine.add_request raises (bad prompt, bad ids)."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped ({self._error or 'shut down'})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        accepted = self._loop.create_future()
        self._send(("add", request_id, prompt, params, accepted))
        try:
            await accepted
        except BaseException:
            # Rejected, or the caller was cancelled while waiting: the abort is applied after
            # the add (the inbox is in order), so nothing is left running.
            self._streams.pop(request_id, None)
            self._send(("abort", request_id))
            raise
        return stream

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """add_request + iterate; leaving the loop early aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join, timeout)

    def _send(self, command: tuple) -> None:
        with self._wake:
            self._inbox.append(command)
            if command[0] == "add":
                self._pending_adds += 1
            self._wake.notify()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_streams(self, request_ids: list[str] | None, exc: BaseException) -> None:
        ids = list(self._streams) if request_ids is None else request_ids
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(exc)

    # ---- engine-thread side ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._next_commands_or_stop():
                pass
            self._loop.call_soon_threadsafe(self._fail_streams, None, EngineDeadError("the engine shut down"))
        except BaseException as exc:  # the loop itself broke: fail every waiting caller
            log.exception("engine thread stopped")
            self._error = exc
            self._loop.call_soon_threadsafe(self._fail_streams, None, EngineDeadError(str(exc)))

    def _next_commands_or_stop(self) -> bool:
        with self._wake:
            while not self._inbox and not self._stopping and not self.engine.has_unfinished_requests():
                self._wake.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
        for command in inbox:
            self._apply(command)
        if self.engine.has_unfinished_requests():
            self._step()
        self.snapshot = _snapshot(self.engine, self.snapshot.num_steps + 1)
        return True

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        _, request_id, prompt, params, accepted = command
        try:
            self.engine.add_request(request_id, prompt, params)
            result: BaseException | None = None
        except Exception as exc:
            result = exc
        with self._wake:
            self._pending_adds -= 1
        self._loop.call_soon_threadsafe(_settle, accepted, result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # The model step failed for the whole batch: fail the requests in it, keep serving.
            log.exception("engine step failed; failing the requests in it")
            ids = self.engine.abort_all()
            self._loop.call_soon_threadsafe(self._fail_streams, ids, RuntimeError(f"engine step failed: {exc}"))
            outputs = []
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _snapshot(engine: LLMEngine, num_steps: int) -> EngineSnapshot:
    s = engine.stats()
    return EngineSnapshot(s["num_requests_running"], s["num_requests_waiting"], s["kv_cache_usage"],
                          s["num_kv_blocks"], s["num_free_blocks"], s["prefix_cache_queries"],
                          s["prefix_cache_hits"], num_steps)


async def load_engine(config, model_path) -> AsyncEngine:
    """Load the model on a worker thread (the event loop keeps answering /health meanwhile)."""
    t0 = time.monotonic()
    engine = await asyncio.to_thread(LLMEngine, config, model_path)
    log.info("model %s loaded in %.1f s", config.model, time.monotonic() - t0)
    return AsyncEngine(engine).start()
