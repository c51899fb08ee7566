"""The streamed response writer (ResponseJob.write_events) against an ASGI send: the SSE
bytes a client gets, a request that fails mid-stream, a client that leaves. The engine
side is RequestStreams fed by hand; the server side (metrics, usage ledger) is real."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa

from r1serve.engine.async_engine import RequestStream
from r1serve.outputs import CompletionOutput, RequestOutput
from r1serve.accounts.accounts import Accounts, Principal
from r1serve.accounts.database import usage_ledger
from r1serve.server.engine_request import PromptInput
from r1serve.server.metrics import ServerMetrics
from r1serve.server.protocol import CompletionRequest
from r1serve.server.response_job import ClientGone
from r1serve.server.serving_completion import _Completion


@dataclass
class _Engine:
    """What a RequestStream tells its engine: which requests it aborted or let go."""

    aborted: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    tokenizer: None = None

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)


@dataclass
class _Model:
    metrics: ServerMetrics
    engine: _Engine
    name: str = "tiny"
    fingerprint: str = "r1serve-test"


def output(i: int, last: bool) -> RequestOutput:
    c = CompletionOutput(0, f" t{i}", [100 + i], "length" if last else None)
    return RequestOutput("cmpl-1", None, None, [c], last, 0, {"first_token_time": 1.0})


def ledger(accounts: Accounts) -> list[tuple[str, int]]:
    with accounts.db.begin() as conn:
        rows = conn.execute(sa.select(usage_ledger.c.status, usage_ledger.c.completion_tokens))
        return [tuple(r) for r in rows]


def events(body: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]


@pytest.fixture()
def job_parts(tmp_path):
    accounts = Accounts(f"sqlite:///{tmp_path / 'ledger.db'}")
    engine = _Engine()
    model = _Model(ServerMetrics(lambda: {}), engine)
    req = CompletionRequest(model="tiny", prompt="hi", max_tokens=3, stream=True,
                            stream_options={"include_usage": True})

    def make():
        job = _Completion(model, req, "cmpl-1", [PromptInput("hi", [1, 2])],
                          accounts.meter(Principal(None), "tiny", "cmpl-1"))
        return job, RequestStream("cmpl-1", engine)

    return make, accounts, engine


def run_writer(job, stream, feed, accounts: Accounts) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def main():
        writer = asyncio.ensure_future(job.write_events([stream], send))
        await feed(stream)
        await writer
        await accounts.drain()  # a report settled in the background (the client left)

    asyncio.run(main())
    return sent


def test_a_stream_is_one_message_per_output_then_usage_and_done(job_parts):
    make, accounts, engine = job_parts
    job, stream = make()

    async def feed(s):
        for i in range(3):
            s.put(output(i, last=i == 2))
            await asyncio.sleep(0)

    sent = run_writer(job, stream, feed, accounts)
    assert [m["more_body"] for m in sent] == [True] * 3 + [False]
    chunks = [json.loads(e) for m in sent[:3] for e in events(m["body"])]
    assert [c["choices"][0]["text"] for c in chunks] == [" t0", " t1", " t2"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    usage, done = events(sent[3]["body"])
    assert json.loads(usage)["usage"]["completion_tokens"] == 3 and done == "[DONE]"
    assert engine.aborted == [] and engine.forgotten == ["cmpl-1"]
    assert ledger(accounts) == [("ok", 3)]


def test_a_failure_mid_stream_ends_that_stream_with_an_error_event(job_parts, monkeypatch):
    make, accounts, engine = job_parts
    job, stream = make()
    calls = []

    def broken(index, out):
        calls.append(out)
        if len(calls) == 2:
            raise KeyError("a bug")
        return _Completion.on_output(job, index, out)

    monkeypatch.setattr(job, "on_output", broken)

    async def feed(s):
        for i in range(3):
            s.put(output(i, last=i == 2))
            await asyncio.sleep(0)

    sent = run_writer(job, stream, feed, accounts)
    error, done = events(sent[-1]["body"])
    assert json.loads(error)["error"]["type"] == "server_error" and done == "[DONE]"
    assert sent[-1]["more_body"] is False
    assert engine.aborted == ["cmpl-1"]  # the engine request stops with the response
    assert ledger(accounts) == [("error", 1)]


def test_a_client_that_leaves_aborts_the_request_and_is_counted(job_parts):
    make, accounts, engine = job_parts
    job, stream = make()

    async def feed(s):
        s.put(output(0, last=False))
        await asyncio.sleep(0.01)
        s.abort(ClientGone())  # what the connection watcher does on http.disconnect

    sent = run_writer(job, stream, feed, accounts)
    assert len(sent) == 1 and sent[0]["more_body"] is True  # nothing is written after the client left
    assert engine.aborted == ["cmpl-1"] and job.finish_reasons == ["abort"]
    assert ledger(accounts) == [("aborted", 1)]
