"""The engine for asyncio callers: one queue per request, outputs batched per step.

    event loop (server)                       engine core (engine_core.py)
    -------------------                       ----------------------------
    add_request() --(AddRequest, AbortRequest)--> apply commands, engine.step()
    RequestStream  <--(call_soon_threadsafe)----- Stepped: the step's outputs, one batch per step

The core runs in a process of its own (`r1serve serve`) or on a thread (in-process use,
tests); either way the event loop never blocks on a model step. Commands are applied
between steps, so an add or abort waits at most one step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, AsyncIterator

from r1serve.engine.core_messages import (AbortRequest, Added, AddRequest, Failed, Reply, Stepped,
                                          Stopped, unknown_message)
from r1serve.engine.core_messages import Prompt, prompt_text
from r1serve.engine.engine_core import EngineCore, ProcessCore, ThreadCore
from r1serve.engine.engine_stats import EngineStats
from r1serve.errors import EngineDeadError
from r1serve.models.checkpoint import open_checkpoint
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams

if TYPE_CHECKING:  # torch's: imported where an engine runs in this process, not by the server alone
    from r1serve.engine.llm_engine import LLMEngine

log = logging.getLogger("r1serve.engine")

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "EngineStepError", "RequestStream", "load_engine"]


class EngineStepError(RuntimeError):
    """A model step failed for the batch this request was in; the request is over."""


class RequestStream:
    """The outputs of one request, as an async iterator; ends after the finished output."""

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        # A deque and one waiter rather than an asyncio.Queue: this is read once per token and
        # stream, and Queue.get's bookkeeping was a tenth of the server's CPU per chunk.
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future | None = None
        self.finished = False  # the engine request is over (its last output came, or it was aborted)
        self._drained = False  # the reader has had the last item
        self.prompt: str | None = None  # the request's prompt text and ids, as the engine took them
        self.prompt_token_ids: list[int] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._drained:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException) or item.finished:
            self._drained = self.finished = True
            self._engine.forget(self.request_id)
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, reason: BaseException | None = None) -> None:
        """Stop the request (a client went away): its KV blocks are freed before the next step.
        A reader still iterating gets `reason` raised after what was already queued."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)
        if reason is not None and not self._drained:
            self.put(reason)


class AsyncEngine:
    """The event-loop side of an engine core; also the core's EngineSink."""

    def __init__(self, core: EngineCore, tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.stats = EngineStats()  # the engine's latest (core_messages.Stepped)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # touched by the event loop only
        self._accepting: dict[str, asyncio.Future] = {}  # adds the core has not answered yet
        self._error: str | None = None
        self._stopped = False

    @classmethod
    def on_thread(cls, engine: LLMEngine) -> AsyncEngine:
        """An engine already loaded in this process, stepped on a thread of its own."""
        return cls(ThreadCore(engine), engine.tokenizer, engine.max_model_len, engine.loaded.arch.vocab_size)

    def start(self) -> AsyncEngine:
        self._loop = asyncio.get_running_loop()
        self.core.start(self)
        return self

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: waiting in the scheduler plus adds not yet applied."""
        return self.stats.num_requests_waiting + len(self._accepting)

    @property
    def error(self) -> str | None:
        """Why the engine stopped, if it stopped on an error."""
        return self._error

    @property
    def is_alive(self) -> bool:
        return not self._stopped and self._error is None and self.core.is_alive()

    # ---- event-loop side -------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Queue a request; raises what LLMEngine.add_request raises (bad prompt, bad ids)."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped ({self._error or 'shut down'})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream = RequestStream(request_id, self)
        stream.prompt = prompt_text(prompt)
        self._streams[request_id] = stream
        accepted = self._loop.create_future()
        self._accepting[request_id] = accepted
        self.core.send(AddRequest(request_id, prompt, params))
        try:
            await accepted
        except BaseException:
            # Rejected, or the caller was cancelled while waiting: the abort is applied after
            # the add (commands are applied in order), so nothing is left running.
            self._accepting.pop(request_id, None)
            self._streams.pop(request_id, None)
            self.core.send(AbortRequest(request_id))
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
        self.core.send(AbortRequest(request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def shutdown(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.core.stop, timeout)

    # ---- EngineSink: called off the event loop, handed to it -------------------------------

    def report(self, reply: Reply) -> None:
        match reply:
            case Stepped(outputs=outputs, stats=stats):  # first: one per step, the rest are rare
                self.stats = stats
                if outputs:
                    self._to_loop(self._dispatch, outputs)
            case Added():
                self._to_loop(self._settle, reply)
            case Failed(request_ids=request_ids, message=message):
                self._to_loop(self._fail_streams, request_ids, EngineStepError(message))
            case Stopped(error=error):
                if error is not None:
                    self._error = error
                self._to_loop(self._on_stopped)
            case _:
                raise TypeError(f"not an engine core reply: {unknown_message(reply, Reply)}")

    def _to_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    # ---- on the event loop -----------------------------------------------------------------

    def _settle(self, added: Added) -> None:
        stream = self._streams.get(added.request_id)
        if stream is not None:
            stream.prompt_token_ids = added.prompt_token_ids
        future = self._accepting.pop(added.request_id, None)
        if future is None or future.done():  # the caller was cancelled meanwhile
            return
        if added.error is None:
            future.set_result(None)
        else:
            future.set_exception(added.error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                if out.prompt_token_ids is None:  # sent without its prompt (ProcessCore)
                    out.prompt, out.prompt_token_ids = stream.prompt, stream.prompt_token_ids
                stream.put(out)

    def _fail_streams(self, request_ids: list[str] | None, exc: BaseException) -> None:
        ids = list(self._streams) if request_ids is None else request_ids
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(exc)

    def _on_stopped(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._error:
            log.error("engine stopped: %s", self._error)
        dead = EngineDeadError(self._error or "the engine shut down")
        for future in self._accepting.values():
            if not future.done():
                future.set_exception(dead)
        self._accepting.clear()
        self._fail_streams(None, dead)


def _tokenizer(model_path):
    """The API process's own tokenizer, built while the engine loads (the rest it needs of the
    model comes in EngineInfo)."""
    return open_checkpoint(model_path).tokenizer()


async def load_engine(config, model_path, own_process: bool = True, core=None) -> AsyncEngine:
    """Load the model in a process of its own (or, with own_process=False, on a worker thread
    of this one); the event loop keeps answering /health meanwhile. `core`: a ProcessCore
    already spawned for it. This process builds its own tokenizer while the engine loads."""
    t0 = time.monotonic()
    if own_process or config.data_parallel_size > 1:
        if core is None and config.data_parallel_size > 1:
            from r1serve.engine.data_parallel import DataParallelCore

            core = DataParallelCore(config, model_path)
        core = core or ProcessCore(config, model_path)
        info, tokenizer = await asyncio.gather(asyncio.to_thread(core.load), asyncio.to_thread(_tokenizer, model_path))
        engine = AsyncEngine(core, tokenizer, info.max_model_len, info.vocab_size)
    else:
        from r1serve.engine.llm_engine import LLMEngine

        engine = AsyncEngine.on_thread(await asyncio.to_thread(LLMEngine, config, model_path))
    log.info("model %s loaded in %.1f s%s", config.model, time.monotonic() - t0,
             f" ({config.data_parallel_size} engine replicas)" if config.data_parallel_size > 1
             else " (engine in its own process)" if own_process else "")
    return engine.start()
