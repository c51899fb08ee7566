"""Running a request's engine requests for a client: all added or none, their outputs merged
as they come, the work cancelled when the client leaves, engine failures as HTTP errors."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request as HTTPRequest

from r1serve.engine.async_engine import AsyncEngine, EngineDeadError, EngineStepError, RequestStream
from r1serve.outputs import RequestOutput
from r1serve.sampling_params import SamplingParams
from r1serve.server.engine_request import PromptInput
from r1serve.server.errors import APIError


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
